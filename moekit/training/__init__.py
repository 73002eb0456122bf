"""moekit.training."""

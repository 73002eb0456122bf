"""moekit.models."""

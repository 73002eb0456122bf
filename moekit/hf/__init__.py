"""moekit.hf."""

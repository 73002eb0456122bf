"""moekit.serving."""

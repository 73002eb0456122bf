"""moekit.data."""

"""moekit.compression."""

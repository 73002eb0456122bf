"""moekit.cli."""

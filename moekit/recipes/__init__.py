"""moekit.recipes."""

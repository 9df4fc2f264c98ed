"""Pure functions over mail bytes and text. Imports nothing from the rest of the project."""

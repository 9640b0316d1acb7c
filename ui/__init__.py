"""hyperdiff's Gradio web UI (`hyperdiff ui`); see `ui.app`. It imports hyperdiff and holds no model logic."""

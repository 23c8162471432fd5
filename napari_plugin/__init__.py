"""surgenet_assist.napari_plugin — see docs/architecture.md."""

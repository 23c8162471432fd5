"""surgenet_assist.backend — see docs/architecture.md."""

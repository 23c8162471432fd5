"""surgenet_assist.training_loop — see docs/architecture.md."""

"""kvpilot's control plane (operator, autoscaler, router). Arrives with the operator issues."""

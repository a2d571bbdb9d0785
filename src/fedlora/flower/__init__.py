"""fedlora on Flower: the apps, their messages, the launcher and the nodes' model keepers."""

CONFIG_KEY = "fedlora-config"
"""The Flower run-config key that carries the resolved fedlora config as JSON."""
OUT_KEY = "out"
"""The run-config key that carries the run folder on the server's host."""
RESUME_KEY = "resume"
"""The run-config key that says whether the ServerApp resumes the run folder's checkpoint."""

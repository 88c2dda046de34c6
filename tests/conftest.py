"""Suite-wide settings."""

from hypothesis import HealthCheck, settings

# Property tests are seeded (derandomize) and must not fail because a busy CI machine made data
# generation slow: timing health checks and deadlines are off, everything else stays on.
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

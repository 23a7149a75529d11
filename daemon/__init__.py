"""The tiered sidecar daemon: watch the local tier, promote, verify, commit, prune, report.

It imports only tiered's light public surface and never jax or orbax, so it starts fast and stays
small in its container. Run it as ``tiered daemon --config FILE`` or ``python -m daemon``.
"""

"""Rollouts: a release or a device config taken to the devices a label selector matches, wave by
wave, each wave gated on what its devices report, rolled back automatically when a gate fails.

- waves.py: how big each wave is and which wave a device joins (pure);
- gates.py: the load-failure, error-rate, latency and tokens/s gates (pure arithmetic);
- evidence.py: per-device figures for the gates, from stored inference summaries;
- engine.py: the state machine, one step of one rollout per transaction (the rules are there);
- actions.py: assigning a device the change, and putting it back (signed through
  controlplane/fleet/director.py);
- store.py: database access; leader.py: which replica drives rollouts; runner.py: the task;
- commands.py, convert.py: what operators do and read; the RPCs are controlplane/api/rollouts.py,
  their refusals' status codes in controlplane/api/refusals.py's table.
"""

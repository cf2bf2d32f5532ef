"""The parts the agent process (edgefleet.agent.service) is made of, one job each.

``supervise`` runs the long-running tasks in task groups and turns a stop into their orderly
cancellation; ``api_server`` the local API's socket and server; ``control`` the conversation
with the control plane (enrollment, certificate renewal, desired state, status reports);
``boot`` the persisted state at start; ``status`` what a status report and /healthz say;
``signals`` how SIGTERM/SIGINT stop the process within a deadline.
"""

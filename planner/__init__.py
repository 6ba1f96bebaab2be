"""moe-plan: memory, communication and a modelled step time per rank, before launch.

One module per concept: shapes (what a rank holds, from the job config), params (its
parameters, from one meta-device block of each kind), activations and moe_activations (what
autograd keeps), sharding, model_states and grad_life (ZeRO 0-3 as the trainer runs them),
memory (itemised bytes and a modelled peak), comms and zero_comms (every collective of a step),
hardware and timing (a modelled step time), plan, search, report, search_report, hook (the
trainer's own plan). Entry point: launcher/plan.py. What each figure means: docs/planner.md.
"""

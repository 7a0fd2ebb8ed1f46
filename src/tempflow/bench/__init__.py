"""The `tempflow bench` commands, apart from the library core (which imports nothing from here).

presets: preset names, preset folders and budgets; learning (with learning_summary and evaluations):
presets trained side by side under one budget; gradient: the signal share of one iteration's policy
gradient; system: one preset's iteration against the compute limit; estimate (with model_sizes and
published_configs): a config's memory per process at real sizes, without running it; cli: the
arguments of every command.
"""

"""Every built-in algorithm lives here.

``defaults.py`` is GRPO's (and SFT's offline) behaviour for every hook, registered first in every
run with ``trylast`` implementations, so each algorithm overrides only what it changes. The other
modules are algorithms selected by name (``grpo``, ``sft``, ``rloo``, ``reinforce_pp``, ``cispo``),
registered through entry points exactly like third-party plugins.
"""

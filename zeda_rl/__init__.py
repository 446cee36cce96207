"""zeda-rl core library: the zero-expert model, routing, losses, conversion, data and wire formats.

Importing it registers the zero-expert architectures with transformers' Auto classes.
"""

from zeda_rl.modeling import register as _register

_register()

__version__ = "0.1.0"

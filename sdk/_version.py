"""The llmos version and the plugin API version plugins declare compatibility with."""

__version__ = "0.1.0"
#: The plugin API major version; a plugin's ``LLMOS_API`` range must admit it.
PLUGIN_API = 1

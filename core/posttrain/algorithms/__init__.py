"""The built-in algorithms, registered through entry points like any third-party plugin."""

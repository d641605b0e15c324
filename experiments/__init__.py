"""The experiments' results, the router study and the old command paths.

The runners themselves live in the package: ``python -m fedjax_adapters.experiments.floral`` (and ``.feddpa``,
``.report``). The modules here forward the old spellings (``python -m experiments.floral``) from a checkout of the
repository; nothing named ``experiments`` is installed.
"""

"""The composition root: builds an experiment from its config and runs, exports or lists it.

It is the only package that knows every other one (``core`` below everything; ``data``,
``models``, ``distributed`` above ``core``; ``algorithms`` above those; ``run`` and ``main`` on
top). Importing this package imports nothing heavy.
"""

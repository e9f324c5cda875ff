"""``pmod demo``: a local web page to ask a p-MoD model about images and watch what each layer keeps.

- ``methods``: the "run as" switch (p-MoD, its dense twin; baselines plug in as entries);
- ``engine``: one request, streamed, with its costs and its routing (no web code);
- ``panels``: the overlay, the matrix and the efficiency table;
- ``app``: the Gradio page; ``server``: checks, loading and serving.
"""

from .methods import DEFAULT_METHODS, DemoMethod, select_methods, shared_weights_copy

__all__ = ["DEFAULT_METHODS", "DemoMethod", "select_methods", "shared_weights_copy"]

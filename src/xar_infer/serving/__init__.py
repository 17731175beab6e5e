"""xar-serve: the engine behind an HTTP API and a web page (``pip install 'xar_infer[serve]'``).

``service`` holds the queue in front of the engine and the batching policy; ``app`` the FastAPI app
(routes, error answers, the event stream of cell previews); ``images`` the bytes sent; ``metrics``
the Prometheus counters; ``cli`` the ``xar-serve`` command; ``ray`` the Ray Serve deployment
(``pip install 'xar_infer[ray]'``); ``static/`` the page. ``create_app`` imports FastAPI, so it is
imported from ``xar_infer.serving.app``, not here: importing the package needs no extra.
"""

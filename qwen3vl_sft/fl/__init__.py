"""NVFlare glue: the site loop (``client``), the server's model and persistor (``server``), the job
(``job``, ``resume``, ``summary``, ``prod``), failure watch (``watch``), the live console (``console``,
``console_view``) and what crosses the network (``exchange``, ``compression``).
"""

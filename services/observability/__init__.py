"""What operators read: ``logs`` (one log configuration, request and job ids, the epoch line) and ``metrics``
(the Prometheus metrics of the gateway and the worker)."""

"""The front doors: the command line (`cli`), the HTTP service (`service`), `watch` (a camera folder), the demo,
Ray (`distributed`), benchmark `evaluation` and `publish` (verdicts to MQTT, webhooks, OPC UA). They call the
library and hold no policy of their own.
"""

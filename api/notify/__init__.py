"""Notifications of alert events: email (SMTP), Slack, Microsoft Teams and a generic webhook.

:mod:`api.notify.message` renders an event once for every channel; :mod:`api.notify.smtp` and
:mod:`api.notify.http` send it; :mod:`api.notify.dispatcher` drains the registry's queue of
delivery attempts (``registry.alerts``), retrying with backoff and recording every attempt.
"""

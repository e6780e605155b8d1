"""Email through an SMTP relay (stdlib ``smtplib``): STARTTLS on 587 by default, implicit TLS, or
plain for a relay on the same host (the tests' ``aiosmtpd``)."""

from __future__ import annotations

import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Literal

from api.notify.errors import DeliveryFailed
from api.notify.message import Message

Security = Literal["starttls", "tls", "none"]


@dataclass(frozen=True)
class SmtpRelay:
    host: str
    port: int
    sender: str
    """The From header and envelope sender."""
    security: Security = "starttls"
    username: str | None = None
    password: str | None = None
    timeout_s: float = 10.0


def header_value(text: str) -> str:
    """``text`` on one line: every run of whitespace (CR, LF and the other line breaks among it)
    one space. An alert's labels reach the Subject: a line break there made ``email`` refuse the
    whole message (every attempt failed alike), and must never start a header of its own."""
    return " ".join(text.split())


def email_message(relay: SmtpRelay, recipients: list[str], message: Message) -> EmailMessage:
    mail = EmailMessage()
    mail["Subject"] = header_value(message.title)
    mail["From"] = header_value(relay.sender)
    mail["To"] = ", ".join(recipients)
    mail["Date"] = formatdate(localtime=False)
    mail["Message-ID"] = make_msgid(domain="ironlink")
    lines = [message.text, "", *(f"{name}: {value}" for name, value in message.facts)]
    if message.link:
        lines += ["", message.link]
    mail.set_content("\n".join(lines) + "\n")
    return mail


def send_email(relay: SmtpRelay, recipients: list[str], message: Message) -> None:
    """Send one mail to every recipient; :class:`DeliveryFailed` saying why (a 5xx refusal is final)."""
    mail = email_message(relay, recipients, message)
    context = ssl.create_default_context()
    try:
        smtp: smtplib.SMTP
        if relay.security == "tls":
            smtp = smtplib.SMTP_SSL(relay.host, relay.port, timeout=relay.timeout_s, context=context)
        else:
            smtp = smtplib.SMTP(relay.host, relay.port, timeout=relay.timeout_s)
        with smtp:
            if relay.security == "starttls":
                smtp.starttls(context=context)
            if relay.username:
                smtp.login(relay.username, relay.password or "")
            smtp.send_message(mail)
    except smtplib.SMTPRecipientsRefused as error:
        codes = {address: code for address, (code, _text) in error.recipients.items()}
        raise DeliveryFailed(
            f"SMTP refused recipients {codes}", retryable=any(c < 500 for c in codes.values())
        ) from error
    except smtplib.SMTPResponseException as error:
        text = (
            error.smtp_error.decode(errors="replace")
            if isinstance(error.smtp_error, bytes)
            else str(error.smtp_error)
        )
        raise DeliveryFailed(f"SMTP {error.smtp_code}: {text}", retryable=error.smtp_code < 500) from error
    except (smtplib.SMTPException, OSError) as error:
        raise DeliveryFailed(f"SMTP {relay.host}:{relay.port}: {error}", retryable=True) from error

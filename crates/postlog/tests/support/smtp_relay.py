#!/usr/bin/python3
"""A real SMTP relay for the sending tests (aiosmtpd, Debian's python3-aiosmtpd).

usage: smtp_relay.py PORT OUT_DIR CONTROL_JSON [CERT_PEM KEY_PEM USER PASSWORD]

With a certificate, the relay requires STARTTLS and then AUTH (PLAIN or LOGIN) with USER and
PASSWORD before MAIL, as a provider's submission port does.

Every accepted transaction is written to OUT_DIR/<time>-<pid>-<n>.txt: the MAIL FROM
address on the first line, the RCPT TO addresses space-separated on the second, then the
message exactly as received.
CONTROL_JSON is re-read on every command, so a test can change the relay's behaviour while
it runs: {"tempfail": N} answers 451 to the first N MAIL commands; {"reject": [addr, ...]}
answers 550 to RCPT for those addresses. Prints "ready" once it listens.
"""
import json
import os
import sys
import time

import ssl

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

port, out_dir, control_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.makedirs(out_dir, exist_ok=True)


def control():
    try:
        with open(control_path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class Relay:
    def __init__(self):
        self.mails = 0
        self.stored = 0

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails += 1
        if self.mails <= control().get("tempfail", 0):
            return "451 4.3.0 try again later (test relay)"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in [a.lower() for a in control().get("reject", [])]:
            return "550 5.1.1 <%s>: no such user (test relay)" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.stored += 1
        record = (
            envelope.mail_from.encode() + b"\n"
            + " ".join(envelope.rcpt_tos).encode() + b"\n"
            + envelope.original_content
        )
        # Unique across restarts of the relay: the tests stop and start it.
        name = "%d-%d-%06d" % (time.time_ns(), os.getpid(), self.stored)
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(out_dir, name + ".txt"))
        return "250 2.0.0 queued as %s" % name


kwargs = {}
if len(sys.argv) > 4:
    cert, key, user, password = sys.argv[4:8]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == user
            and auth_data.password.decode() == password
        )
        return AuthResult(success=ok)

    kwargs = dict(
        tls_context=context,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=True,
    )
controller = Controller(Relay(), hostname="127.0.0.1", port=port, **kwargs)
controller.start()
print("ready", flush=True)
try:
    while True:
        time.sleep(3600)
except KeyboardInterrupt:
    pass

"""How the cutover names a hook in its output and report: the command with its arguments, the URL, secrets masked.

No filter of Ansible or its collections masks the secrets of an argv list or a
URL, hence these two. The rule (docs/runbook.md, "Hooks"):

* a URL keeps its scheme, host, port and path; its userinfo becomes ``***@``,
  each query value ``***`` (the names stay), the fragment is dropped;
* a command keeps its program and arguments, except the value of an option
  whose name looks like a secret (password, passwd, secret, token, key, auth,
  credential, cookie, session, signature): ``--token=X`` and ``--token X``
  become ``--token=***`` and ``--token ***``, ``TOKEN=X`` becomes ``TOKEN=***``;
  an argument that is a URL is masked as above.

Header values are never shown (cutover_hook_headers). A secret given as a bare
argument cannot be told from any other word: put it in an option, the
environment or a header.
"""

import re
import shlex
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"
SECRET_NAME = re.compile(r"pass(word|wd)?|secret|token|key|auth|credential|cookie|session|signature", re.IGNORECASE)
ASSIGNMENT = re.compile(r"^(-{0,2}[A-Za-z0-9_.-]+)=(.*)$", re.DOTALL)


def cutover_masked_url(url):
    """The URL with its userinfo and query values masked and its fragment dropped."""
    parts = urlsplit(str(url))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = "&".join(f"{name}={MASK}" for name, _value in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def cutover_masked_command(argv):
    """The argv list as one shell-quoted line, with the values of secret-named options masked."""
    words, hide_next = [], False
    for argument in [str(word) for word in argv]:
        if hide_next:
            words.append(MASK)
            hide_next = False
            continue
        assignment = ASSIGNMENT.match(argument)
        if "://" in argument:
            words.append(shlex.quote(cutover_masked_url(argument)))
        elif assignment and SECRET_NAME.search(assignment.group(1)):
            words.append(shlex.quote(assignment.group(1) + "=") + MASK)
        else:
            hide_next = argument.startswith("-") and bool(SECRET_NAME.search(argument))
            words.append(shlex.quote(argument))
    return " ".join(words)


class FilterModule:
    def filters(self):
        return {"cutover_masked_url": cutover_masked_url, "cutover_masked_command": cutover_masked_command}

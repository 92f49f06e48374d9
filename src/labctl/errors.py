"""Error kinds that the engine and CLI know how to handle.

User errors (bad profile, site, roster, flags, missing credentials) exit with code 2 and a one-line
message. Provider errors are translated by each adapter into the few kinds below, so that the engine can
decide to fall back (NoCapacity), wait (RateLimited, Transient) or stop (QuotaExceeded, CloudError).
"""

from __future__ import annotations


class LabctlError(Exception):
    """Base of every error labctl reports to the user as one line."""

    exit_code = 1


class UserError(LabctlError):
    """Bad input: profile, site, roster, flags or credentials. Nothing was created."""

    exit_code = 2


class ProfileError(UserError):
    """A profile failed to load or validate; the message names the file and the field."""


class CredentialsError(UserError):
    """Credentials are missing or rejected; the message names the variable or file."""


class CloudError(LabctlError):
    """A cloud call failed in a way that retrying will not fix."""


class NoCapacity(CloudError):
    """The site has no free hosts / capacity for this node type right now: try the next type or zone."""


class QuotaExceeded(CloudError):
    """The project's quota is used up on this site: stop creating here."""


class Conflict(CloudError):
    """The cloud refused a create because the thing is there already (HTTP 409, "already exists", a duplicate
    name): made by a retry after a lost answer or by a concurrent run. Look it up and adopt it."""


class RateLimited(CloudError):
    """The API asked us to slow down (HTTP 429 or equivalent): back off and retry."""


class Transient(CloudError):
    """A timeout or 5xx that is worth retrying."""


class SetupFailed(LabctlError):
    """A setup step failed on one or more nodes; rerunning `labctl up` resumes at that step."""


class Interrupted(LabctlError):
    """The user asked to stop (Ctrl-C): no new work was started, state is saved, a rerun resumes."""

    exit_code = 130

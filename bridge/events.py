"""The event vocabulary and the column -> payload field naming rule.

Naming rule (documented in the README): a column name is split on underscores, each part is
capitalised, and the parts ``id``, ``url``, ``uuid`` become upper case; then QLM's own names win
where they differ (``privacy_policy_consent`` -> ``PrivacyConsent``, ``created_at`` on a customer
-> ``CreationDate``). Operators override any column in `webhooks.field_names`.
"""

from __future__ import annotations

from typing import Final, Literal

Kind = Literal["license", "customer"]

LICENSE_EVENTS: Final = (
    "license_created",
    "license_activated",
    "license_released",
    "license_deleted",
    "license_modified",  # extension: captured only while a URL subscribes to it
)
CUSTOMER_EVENTS: Final = ("customer_created", "customer_modified", "customer_deleted")
ALL_EVENTS: Final = LICENSE_EVENTS + CUSTOMER_EVENTS
QLM_EVENTS: Final = tuple(e for e in ALL_EVENTS if e != "license_modified")

INFO_KEY: Final[dict[str, str]] = {"license": "LicenseInfo", "customer": "CustomerInfo"}

# QLM's own field names where the naming rule (SQL: field_name_v1, computer_id -> ComputerID)
# would say something else.
QLM_FIELD_NAMES: Final[dict[str, dict[str, str]]] = {
    "license": {
        "activation_count": "ActivationCount",
        "created_at": "CreationDate",
    },
    "customer": {
        "privacy_policy_consent": "PrivacyConsent",
        "created_at": "CreationDate",
        "updated_at": "ModifiedDate",
    },
}


def kind_of(event_type: str) -> Kind:
    return "license" if event_type.startswith("license_") else "customer"

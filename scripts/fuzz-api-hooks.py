"""Schemathesis hooks for scripts/fuzz-api.sh.

positive_data_acceptance says a schema-valid request must not be refused.
Three refusals of POST /orders depend on data or on earlier requests, which
JSON Schema cannot state, and the document states them in words instead:

* `422 unknown_sku`: SKUs are rows of the inventory table, not a format;
* `422 validation_failed` for a SKU given twice: lines are unique by SKU
  compared trimmed and upper-cased, which `uniqueItems` cannot say;
* `422 idempotency_key_reused`: a key the fuzzer already sent with another
  body (keys are remembered for 24 h).

Such a failure is dropped only after checking the server's claim against the
request: every SKU it calls unknown was sent and is not in the inventory
(FUZZ_KNOWN_SKUS, read from the fuzz database), every duplicate it names
really repeats an earlier line, the request really carried an
Idempotency-Key. Any other refusal of schema-valid data stays a failure.
"""

import atexit
import collections
import os

import schemathesis
from hypothesis import strategies
from schemathesis.openapi.checks import RejectedPositiveData

KNOWN_SKUS = set(filter(None, os.environ.get("FUZZ_KNOWN_SKUS", "").split(",")))
DUPLICATE = "appears more than once; put the total in one line"
# Rust's `char::is_whitespace` (Unicode White_Space), which `str::trim` strips.
RUST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(
    chr(c) for c in range(0x2000, 0x200B)
) + "\u2028\u2029\u202f\u205f\u3000"


def normalised(sku):
    return sku.strip(RUST_WHITESPACE).upper()


def header(case, name):
    return next(
        (v for k, v in (case.headers or {}).items() if k.lower() == name.lower()), None
    )


def stated_in_words(case, response):
    """Whether this 422 is one of the refusals described above, verified."""
    try:
        error = response.json()["error"]
        skus = [normalised(item["sku"]) for item in case.body["items"]]
    except (ValueError, KeyError, TypeError):
        return False
    code, details = error.get("code"), error.get("details")
    if code == "unknown_sku":
        unknown = set(details["skus"])
        return bool(unknown) and unknown <= set(skus) and not unknown & KNOWN_SKUS
    if code == "validation_failed":
        for detail in details:
            field, message = detail["field"], detail["message"]
            if message != DUPLICATE or not field.startswith("items["):
                return False
            index = int(field[len("items[") : field.index("]")])
            if skus[index] not in skus[:index]:
                return False
        return bool(details)
    if code == "idempotency_key_reused":
        return header(case, "Idempotency-Key") is not None
    return False


@schemathesis.hook
def flatmap_body(context, body):
    """Half of the orders get inventory SKUs in place of generated ones.

    A generated SKU is almost never in the inventory, so without this nearly
    every order ends at `unknown_sku` and the path that stores an order and
    answers 202 (and the stored order's GET) would go unfuzzed. Only the SKU
    strings change, to other strings the schema allows; everything else is
    as generated.
    """
    operation = context.operation
    items = body.get("items") if isinstance(body, dict) else None
    if (
        operation is None
        or operation.label != "POST /orders"
        or not isinstance(items, list)
        or not 0 < len(items) <= len(KNOWN_SKUS)
        or not all(isinstance(item, dict) and isinstance(item.get("sku"), str) for item in items)
    ):
        return strategies.just(body)
    known = dict(body, items=[dict(item, sku=sku) for item, sku in zip(items, sorted(KNOWN_SKUS))])
    return strategies.sampled_from([body, known])


DROPPED = collections.Counter()


@atexit.register
def report():
    if DROPPED:
        counts = ", ".join(f"{code} {n}" for code, n in sorted(DROPPED.items()))
        print(f"Documented data-dependent 422s to schema-valid orders, verified: {counts}")


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keep every failure but a verified, documented, data-dependent 422."""
    if not isinstance(failure, RejectedPositiveData) or response.status_code != 422:
        return True
    if not KNOWN_SKUS:
        raise RuntimeError("FUZZ_KNOWN_SKUS is empty: run this through scripts/fuzz-api.sh")
    if stated_in_words(case, response):
        DROPPED[response.json()["error"]["code"]] += 1
        return False
    return True

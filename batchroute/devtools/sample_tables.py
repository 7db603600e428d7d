"""Input tables for the task jobs: ``batchroute sample --kind tickets|invoices``.

Like the prompt demo (`batchroute.devtools.sample`), each generator returns one Arrow table and
the same (rows, seed) always gives the same table. Text is rendered in Python only for small
*pools* (a few thousand distinct sentences, subjects and invoice headers, and a few dozen long
attachments); rows index into the pools with numpy and are joined with Arrow's string kernels,
chunk by chunk (`sample.CHUNK_ROWS`), so a million rows cost seconds.

tickets (`TICKETS_SCHEMA`), support tickets to classify, in ticket_id (= created_at) order:

    ticket_id      int64, unique, increasing from about 100,000 with random gaps
    subject        string, agreeing with the body's category; "Re: " or "URGENT: " at times
    body           string: 2-8 sentences of support-ticket prose from the category's phrase
                   bank (`TICKET_BANKS`) plus neutral context and closing sentences, usually
                   between a greeting and a sign-off. About 2% are null, and about 1% are very
                   long (20,000-60,000 chars): the ticket followed by a pasted log (bug reports)
                   or a quoted email thread
    priority       string: low / normal / high / urgent, mostly normal; skewed by category
                   (bug and account tickets run hotter than feedback)
    customer_tier  string: free / pro / enterprise, mostly free
    created_at     timestamp[us, tz=UTC], four days from Monday 2026-03-02, busiest in
                   office hours
    category       string: billing / bug / how-to / account / other, the category the row was
                   generated from. It is the ground truth for scoring a classifier: a job's
                   template must not use it (it would hand the model the answer).

invoices (`INVOICES_SCHEMA`), invoices as vendors email them, to extract fields from, in
invoice_id (= issue date) order:

    invoice_id     string, "INV-2026-004213", unique; it is also the invoice number in `text`
    vendor         string, one of `VENDORS` (fictional companies in the US, the euro area and
                   the UK), each with its own trade, currency, tax rate and address
    text           string: the invoice, in one of three layouts (a fixed-width table, an email
                   with bullet lines, a compact pipe table that writes euro amounts as
                   1.234,56): invoice number, issue and due dates, bill-to, 1-6 line items with
                   quantity, unit price and amount, subtotal, tax, total and currency. The
                   arithmetic is exact (whole cents, tax rounded half up). About 2% are null
                   and about 0.5% are very long (20,000-60,000 chars: the invoice followed by
                   the vendor's statement of account, hundreds of earlier invoices and
                   payments whose amounts are not this invoice's total)
    true_total     string: the total in `text` as a plain decimal with two places ("1469.13",
                   no thousands separator), exact where a float would not be; null where
                   `text` is null. Ground truth, like true_currency: not for templates
    true_currency  string: USD / EUR / GBP (about 60/25/15%); null where `text` is null
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from batchroute.devtools.sample import CHUNK_ROWS, write
from batchroute.errors import ConfigError

__all__ = ["CATEGORIES", "CURRENCIES", "INVOICES_SCHEMA", "LONG_CHARS", "TABLE_KINDS",
           "TICKETS_SCHEMA", "TICKET_BANKS", "VENDORS", "generate_invoices",
           "generate_tickets", "run_cli"]

TABLE_KINDS = ("tickets", "invoices")

TICKETS_SCHEMA = pa.schema([
    pa.field("ticket_id", pa.int64(), nullable=False),
    pa.field("subject", pa.string(), nullable=False),
    pa.field("body", pa.string()),
    pa.field("priority", pa.string(), nullable=False),
    pa.field("customer_tier", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("category", pa.string(), nullable=False),
])

INVOICES_SCHEMA = pa.schema([
    pa.field("invoice_id", pa.string(), nullable=False),
    pa.field("vendor", pa.string(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("true_total", pa.string()),
    pa.field("true_currency", pa.string()),
])

CATEGORIES = ("billing", "bug", "how-to", "account", "other")
CATEGORY_SHARES = (0.24, 0.28, 0.22, 0.16, 0.10)
PRIORITIES = ("low", "normal", "high", "urgent")
_PRIORITY_SHARES = {
    "billing": (0.15, 0.60, 0.20, 0.05),
    "bug": (0.10, 0.50, 0.28, 0.12),
    "how-to": (0.30, 0.62, 0.06, 0.02),
    "account": (0.10, 0.55, 0.25, 0.10),
    "other": (0.50, 0.46, 0.03, 0.01),
}
TIERS = ("free", "pro", "enterprise")
TIER_SHARES = (0.60, 0.30, 0.10)

NULL_BODY_FRACTION = 0.02
LONG_BODY_FRACTION = 0.01
NULL_TEXT_FRACTION = 0.02
LONG_TEXT_FRACTION = 0.005
LONG_CHARS = (20_000, 60_000)
# Long attachments stop at the first message (or log line, or clause) past a target drawn
# from this range; the margins leave room for that overshoot and for the ticket or invoice
# in front of them, so that every long text lands within LONG_CHARS.
_ATTACHMENT_TARGET = (20_500, 55_000)
_LONG_POOL_CAP = 32      # distinct long attachments per category (tickets) or in all (invoices)
_CORE_POOL_CAP = 4096    # distinct (subject, lead, details) per category
_MAX_DETAILS = 5

TICKET_ID_START = 100_000
_TICKET_START = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)  # a Monday
_TICKET_DAYS = 4
# Share of tickets opened in each UTC hour: quiet at night, busiest mid-morning.
_HOUR_WEIGHTS = np.array([1, 1, 1, 1, 1, 2, 3, 5, 8, 10, 10, 9, 8, 9, 9, 8, 7, 6, 5, 4, 3, 2,
                          2, 1], dtype=np.float64)

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------------------------
# Public API


def generate_tickets(rows: int = 20000, *, seed: int = 0) -> pa.Table:
    """Return `rows` support tickets matching `TICKETS_SCHEMA`; the same table for the same
    arguments. Raises ValueError if rows or seed is negative."""
    _check_args(rows, seed)
    streams = np.random.SeedSequence(seed).spawn(3)
    rnd = random.Random(int(np.random.default_rng(streams[0]).integers(2**63)))
    rng = np.random.default_rng(streams[1])
    time_rng = np.random.default_rng(streams[2])

    category = rng.choice(len(CATEGORIES), size=rows, p=CATEGORY_SHARES).astype(np.int64)
    shape = _shapes(rng, rows, NULL_BODY_FRACTION, LONG_BODY_FRACTION)
    pools = _TicketPools.build(np.bincount(category, minlength=len(CATEGORIES)),
                               np.bincount(category[shape == _LONG],
                                           minlength=len(CATEGORIES)), rnd)
    plan = _TicketPlan.draw(category, shape, pools, rng)
    ticket_id, created_at = _ticket_ids_and_times(rows, time_rng)
    return _materialise_tickets(plan, pools, ticket_id, created_at)


def generate_invoices(rows: int = 20000, *, seed: int = 0) -> pa.Table:
    """Return `rows` emailed invoices matching `INVOICES_SCHEMA`; the same table for the same
    arguments. Raises ValueError if rows or seed is negative."""
    _check_args(rows, seed)
    streams = np.random.SeedSequence(seed).spawn(2)
    rnd = random.Random(int(np.random.default_rng(streams[0]).integers(2**63)))
    rng = np.random.default_rng(streams[1])
    plan = _InvoicePlan.draw(rows, rng)
    pools = _InvoicePools.build(int(np.count_nonzero(plan.shape == _LONG)), rnd)
    return _materialise_invoices(plan, pools, rng)


def run_cli(args: argparse.Namespace) -> int:
    """``batchroute sample --kind tickets|invoices``: write the file, print what it holds."""
    if args.force_models:
        raise ConfigError("--force-model applies to --kind prompts only")
    if args.mmlu is not None:
        raise ConfigError("--mmlu applies to --kind prompts only")
    if args.kind == "tickets":
        table = generate_tickets(args.rows, seed=args.seed)
        counts = _value_counts(table["category"])
        summary = ", ".join(f"{c} {counts.get(c, 0):,}" for c in CATEGORIES)
        summary += (f"; null body {table['body'].null_count:,}, "
                    f"long body {_count_long(table['body']):,}")
    elif args.kind == "invoices":
        table = generate_invoices(args.rows, seed=args.seed)
        counts = _value_counts(table["true_currency"])
        summary = ", ".join(f"{c} {counts.get(c, 0):,}" for c in CURRENCIES)
        summary += (f"; null text {table['text'].null_count:,}, "
                    f"long text {_count_long(table['text']):,}")
    else:
        raise ValueError(f"unknown table kind {args.kind!r}; expected one of {TABLE_KINDS}")
    write(table, args.out)
    print(f"sample: wrote {table.num_rows:,} {args.kind} to {args.out} ({summary})")
    return 0


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column)
    return {value: count for value, count in zip(
        counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
        if value is not None}


def _count_long(column: pa.ChunkedArray) -> int:
    long = pc.greater_equal(pc.utf8_length(column), LONG_CHARS[0])
    return int(pc.sum(long).as_py() or 0)


def _check_args(rows: int, seed: int) -> None:
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


# --------------------------------------------------------------------------------------------
# Shared helpers


_ORDINARY, _NULL, _LONG = 0, 1, 2


def _shapes(rng: np.random.Generator, rows: int, null_fraction: float,
            long_fraction: float) -> IntArray:
    """Per row: ordinary, null or long text, with exact (rounded) counts at random places."""
    shape = np.full(rows, _ORDINARY, dtype=np.int64)
    n_null, n_long = round(rows * null_fraction), round(rows * long_fraction)
    chosen = rng.permutation(rows)[:n_null + n_long]
    shape[chosen[:n_null]] = _NULL
    shape[chosen[n_null:]] = _LONG
    return shape


def _draw(rng: np.random.Generator, pool_size: int, n: int) -> IntArray:
    """n indices into a pool: all distinct while the pool lasts, then with replacement."""
    if n <= pool_size:
        return rng.permutation(pool_size)[:n].astype(np.int64)
    return rng.integers(0, pool_size, size=n, dtype=np.int64)


def _take(pool: pa.Array, index: IntArray, missing: BoolArray | None = None) -> pa.Array:
    """pool[index] as Arrow, null where `missing` (whose indices need not be valid)."""
    if missing is None:
        return pool.take(pa.array(index))
    return pool.take(pa.array(np.where(missing, 0, index), mask=missing))


def _join(parts: Sequence[Any], separator: str | pa.Array) -> pa.Array:
    """Join strings element-wise, skipping null parts.

    The first part must have no nulls: pyarrow's binary_join_element_wise with
    null_handling="skip" drops rows in which every part is null (the result comes out
    shorter than its inputs), so every skip-join here leads with a part that is always set.
    """
    first = parts[0]
    if isinstance(first, pa.Array | pa.ChunkedArray) and first.null_count:
        raise ValueError("the first part of a skip-join must have no nulls")
    return pc.binary_join_element_wise(*parts, separator, null_handling="skip")


def _concat(*parts: Any) -> pa.Array:
    """Concatenate strings element-wise; a null part makes the row null."""
    return pc.binary_join_element_wise(*parts, "")


def _stop_past(target: int, make: Callable[[], str], first: str) -> str:
    """`first`, then lines from `make` until the text is at least `target` long."""
    pieces = [first]
    length = len(first)
    while length < target:
        pieces.append(make())
        length += 1 + len(pieces[-1])
    return "\n".join(pieces)


_FIRST_NAMES = ("Dana", "Priya", "Tom", "Ana", "Kenji", "Fatima", "Liam", "Mei", "Ola", "Sofia",
                "Marcus", "Aisha", "Jonas", "Elena", "Ravi", "Chloe", "Diego", "Hannah",
                "Yusuf", "Ingrid", "Samir", "Lucy", "Mateo", "Zoe")
_LAST_NAMES = ("Kim", "Raman", "Becker", "Souza", "Sato", "Haddad", "O'Neill", "Chen", "Nordmann",
               "Rossi", "Johnson", "Khan", "Weber", "Petrova", "Patel", "Martin", "Garcia",
               "Schmidt", "Yilmaz", "Larsen", "Okafor", "Brown", "Lopez", "Novak")


def _person(rnd: random.Random) -> tuple[str, str]:
    return rnd.choice(_FIRST_NAMES), rnd.choice(_LAST_NAMES)


# --------------------------------------------------------------------------------------------
# Ticket phrase banks. Each category is a few issues (subjects, lead sentences and detail
# sentences that belong together) plus details any ticket of the category can carry. Neutral
# sentences (context, closers, greetings, sign-offs) carry no category; everything else names
# its category plainly, so a person could label every body.


@dataclass(frozen=True)
class _Issue:
    subjects: tuple[str, ...]
    leads: tuple[str, ...]
    details: tuple[str, ...]


@dataclass(frozen=True)
class TicketBank:
    """The phrase bank of one category: `str.format` templates over `_TICKET_WORDS` slots."""

    issues: tuple[_Issue, ...]
    details: tuple[str, ...]  # any issue of the category

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(s for issue in self.issues for s in issue.subjects)

    @property
    def sentences(self) -> tuple[str, ...]:
        """Every body sentence template of the category."""
        return (*(s for issue in self.issues for s in (*issue.leads, *issue.details)),
                *self.details)


TICKET_BANKS: dict[str, TicketBank] = {
    "billing": TicketBank(issues=(
        _Issue(("Charged twice for {plan} plan", "Duplicate charge on my card",
                "Double payment in {month}"),
               ("I was charged twice for the {plan} plan this month.",
                "My card shows two identical charges of {amount} from you on {date}.",
                "We have been billed twice for our {plan} subscription in {month}."),
               ("Both charges went through on the same card within a few minutes.",
                "Only one of the two charges appears on the invoices in the billing page.",
                "Please refund the duplicate payment of {amount}.",
                "Our finance team flagged the extra charge during the monthly reconciliation.")),
        _Issue(("Refund request for {plan} plan", "Requesting a refund for {month}",
                "Refund after cancelling"),
               ("I cancelled our {plan} plan on {date} but was still charged {amount}.",
                "I would like a refund for our last payment of {amount}.",
                "We downgraded from {plan} to {plan2} but were charged for the old plan."),
               ("The cancellation confirmation email arrived the same day.",
                "Nobody on our team has used the paid features since we cancelled.",
                "Could you confirm how long the refund takes to reach the card?",
                "Your terms say unused time is refunded pro rata.")),
        _Issue(("Need an invoice with our VAT number", "Invoice for {month} missing",
                "Wrong company name on invoice"),
               ("The invoice for {month} does not show our VAT number.",
                "I cannot find the invoice for our {month} payment on the billing page.",
                "Our invoices are issued to the wrong company name."),
               ("Our accounts department cannot process an invoice without it.",
                "The invoice number on the receipt is {invoice}.",
                "Please reissue the invoice with the correct billing address.",
                "We need the invoices for the whole year for our tax return.")),
        _Issue(("Payment failed for {plan} renewal", "Card declined on renewal",
                "Updating our payment method"),
               ("The renewal payment for our {plan} plan failed even though the card is valid.",
                "Your checkout declined my card when I tried to pay the invoice of {amount}.",
                "I need to change the card we pay with before the next billing date."),
               ("The bank says it never saw the payment attempt.",
                "We would prefer to pay by bank transfer from now on.",
                "Please do not suspend the subscription while we sort out the payment.",
                "I added a new card because the old one expires, but the old one was charged.")),
        _Issue(("Billed for seats we removed", "Unexpected price increase",
                "Question about seat pricing on {plan}"),
               ("We were billed for {n} seats although we removed {n2} users last month.",
                "Our bill went up from {amount} to {amount2} without any notice.",
                "The price per seat on our {plan} invoice is higher than on your pricing "
                "page."),
               ("The users were deactivated before the billing date.",
                "Nobody on our side changed the subscription.",
                "Please explain how the prorated charges were calculated.",
                "We were promised the old price until the end of our contract.")),
    ), details=(
        "Please copy our finance team on the reply about this charge.",
        "The charge appears on our bank statement as ACME*SUBSCRIPTION.",
        "We pay annually in advance, so this billing error affects the whole year.",
    )),
    "bug": TicketBank(issues=(
        _Issue(("{product} crashes on startup", "App crashes when I open {feature}",
                "Crash after updating to {version}"),
               ("{product} crashes every time I open it on my {device}.",
                "The app closes without warning as soon as I open {feature}.",
                "Since the update to version {version}, {product} crashes when I upload a "
                "file."),
               ("Reinstalling the app did not stop the crashes.",
                "The crashes started right after the latest update.",
                "I attached the crash report from the device.",
                "The crash happens on my {device} and on my colleague's {device2} too.")),
        _Issue(("Error {code} when saving", "Getting error {code} in {product}",
                "'Something went wrong' on every page"),
               ("I get error {code} whenever I try to save changes in {product}.",
                "Every page in {product} shows 'Something went wrong' with error {code}.",
                "The {integration} sync fails with error {code} since this morning."),
               ("The error appears in {browser} and in {browser2}.",
                "Clearing the cache and cookies did not make the error go away.",
                "Saving worked fine until yesterday.",
                "Other people in my team get exactly the same error.")),
        _Issue(("Data not syncing between devices", "Changes lost after saving",
                "{integration} sync stopped working"),
               ("Changes I make on my {device} do not show up in the web dashboard.",
                "Edits to our {data} disappear a few minutes after I save them.",
                "The {integration} integration stopped syncing {data} on {date}."),
               ("The last successful sync was on {date}.",
                "We had to re-enter the same records three times because of the lost edits.",
                "The sync status says everything is up to date, but the records are missing.",
                "Steps to reproduce: edit a record, save it, then refresh the page.")),
        _Issue(("{product} is extremely slow", "Dashboard takes minutes to load",
                "Timeouts when exporting {data}"),
               ("{product} has become extremely slow over the last few days.",
                "The dashboard takes more than two minutes to load for our whole team.",
                "Exports of {data} time out before the file is ready."),
               ("Our connection is fine and every other site loads quickly.",
                "The slowness is worst in the morning, {region} time.",
                "Smaller exports of a few hundred rows still finish without a timeout.",
                "The browser console shows requests taking over 30 seconds.")),
        _Issue(("{feature} button does nothing", "Broken layout in {browser}",
                "Notifications not arriving"),
               ("Clicking the {feature} button does nothing at all.",
                "The settings page layout is broken in {browser} and the save button is "
                "hidden.",
                "Email notifications from {product} stopped arriving on {date}."),
               ("I tried it in a private window with all extensions disabled.",
                "A screenshot of the broken screen is attached.",
                "This bug blocks our team from finishing the monthly report.",
                "It looks like a regression from the last release.")),
    ), details=(
        "My setup: {product} on {os}.",
        "I can send logs or a screen recording of the bug if that helps.",
        "The problem is reproducible every single time.",
    )),
    "how-to": TicketBank(issues=(
        _Issue(("How do I export {data} to CSV?", "Exporting all our {data}",
                "Bulk export question"),
               ("How do I export all our {data} from {product} to a CSV file?",
                "Is there a way to download our {data} in bulk instead of one by one?",
                "What is the best way to move our {data} into a spreadsheet?"),
               ("In the settings I could only find an export for single records.",
                "Ideally the export would include our custom fields.",
                "We need to do this every month, so a scheduled export would be even "
                "better.")),
        _Issue(("Connecting {product} to {integration}", "How to set up {integration}?",
                "Help setting up an integration"),
               ("How do I connect {product} to our {integration} account?",
                "Can you explain how to set up the {integration} integration for our "
                "workspace?",
                "Is it possible to send new {data} from {product} to {integration} "
                "automatically?"),
               ("The help article mentions an API key, but where do I create one?",
                "We only want some of the records to go across, not all of them.",
                "I am an admin in both tools, so permissions should not be the problem.")),
        _Issue(("How to enable {feature}?", "Setting up {feature} for the team",
                "Where did {feature} go?"),
               ("How do I turn on {feature} for everyone in our workspace?",
                "Where do I set up {feature} in the new settings menu?",
                "Does the {plan} plan include {feature}, and if so how do I enable it?"),
               ("The documentation seems to describe an older version of the settings page.",
                "We want to roll it out to one team first and to everyone later.",
                "A short step-by-step guide would be perfect.")),
        _Issue(("Adding users to our workspace", "How do roles work?",
                "Giving a contractor limited access"),
               ("How do I add new users to our workspace and give them edit rights?",
                "What is the difference between the admin and member roles?",
                "Can I give a contractor access to one project without showing them the "
                "rest?"),
               ("We have {n} new people starting next week who will need it.",
                "Some users should only be able to view, not edit.",
                "Is there a read-only role that does not need a full seat?")),
        _Issue(("Scheduling a weekly report", "Can {product} send automatic reminders?",
                "Setting up recurring tasks"),
               ("Can {product} email me a summary of our {data} every Monday morning?",
                "Is there a way to send automatic reminders to customers before a due date?",
                "How do I make a task repeat every month?"),
               ("Right now I put the summary together by hand every week.",
                "It would be fine if the report came as a PDF attachment.",
                "The reminder should go out three days before the due date.")),
    ), details=(
        "I searched the help center but could not find how to do this.",
        "I am new to {product}, so sorry if this is a basic question.",
        "Is there a tutorial or video that walks through the setup?",
    )),
    "account": TicketBank(issues=(
        _Issue(("Password reset email not arriving", "Can't reset my password",
                "Password reset link expired"),
               ("The password reset email never arrives, even after several tries.",
                "I cannot reset my password because the reset link says it has expired.",
                "I forgot my password and the reset form says my email is not registered."),
               ("I checked the spam folder and there is no reset email there either.",
                "I am sure it is the same email address I signed up with.",
                "I requested a new reset link and clicked it within a minute.")),
        _Issue(("Locked out of my account", "Lost my phone, can't log in",
                "Two-factor code not accepted"),
               ("My account is locked after too many login attempts.",
                "I lost the phone with my two-factor app and now I cannot log in.",
                "The two-factor code from my authenticator app is always rejected."),
               ("I still have access to the email address on the account.",
                "I did not save the backup codes when I set up two-factor authentication.",
                "The clock on my phone is set automatically, so the codes should be "
                "right.")),
        _Issue(("Change the email on my account", "Transfer account ownership",
                "New account owner needed"),
               ("I need to change the email address on my account to my new work address.",
                "Our account owner has left the company and we need to transfer ownership to "
                "me.",
                "Please make {name} the owner of our account, since they now run the team."),
               ("The old email address no longer exists, so I cannot confirm from it.",
                "I can confirm my identity with the last four digits of the card on file.",
                "{name} already has a login as a regular member.")),
        _Issue(("SSO login failing", "Keeps logging me out", "Can't sign in with Google"),
               ("Since yesterday our team cannot sign in with single sign-on.",
                "{product} logs me out every few minutes and I have to sign in again.",
                "Signing in with my Google account sends me back to the login page."),
               ("Logging in with a password still works for the admin account.",
                "Getting signed out happens on every device I use.",
                "We did not change anything in our identity provider.")),
        _Issue(("Please delete my account", "Close our workspace account",
                "Delete my personal data"),
               ("Please delete my account and all the data linked to it.",
                "We want to close our workspace account at the end of the month.",
                "Under GDPR I would like all my personal data to be deleted."),
               ("I already exported everything I need before the account goes.",
                "Please confirm in writing once the account is deleted.",
                "Make sure the account cannot be reactivated by anyone afterwards.")),
    ), details=(
        "My username is {email}.",
        "The login in question is registered under {email}.",
        "I have admin rights on the account.",
    )),
    "other": TicketBank(issues=(
        _Issue(("Great update!", "Thank you to the support team", "Love the new {feature}"),
               ("I just wanted to say that the new {feature} saves our team a lot of time.",
                "Thanks to your support team for sorting out our question so quickly last "
                "week.",
                "The latest version of {product} is a big improvement."),
               ("Keep up the good work.",
                "Our whole team noticed the difference straight away.",
                "I have recommended {product} to two other companies.")),
        _Issue(("Feature request: {feature}", "Suggestion for {product}",
                "Would love a dark mode"),
               ("It would be great if {product} had an option for {feature}.",
                "Please consider adding a dark mode to the {device} app.",
                "Could you add keyboard shortcuts for the most common actions?"),
               ("Many of our users have asked for this feature.",
                "Other tools we use already offer something like it.",
                "I would be happy to test an early version of the feature.")),
        _Issue(("Partnership inquiry", "Press request", "Reseller program"),
               ("We are a consultancy in {region} and would like to become a reseller of "
                "{product}.",
                "I am writing an article about remote work tools and would like to interview "
                "someone from your team.",
                "Our company would like to discuss a partnership around {integration}."),
               ("Who would be the right person to talk to?",
                "We already work with {n} customers who use {product}.",
                "The article will be published next month.")),
        _Issue(("Unhappy with the recent changes", "Disappointed with the new design",
                "General feedback"),
               ("The new design of {product} makes it harder to find the things I use every "
                "day.",
                "I am disappointed that the {device} app offers much less than the web "
                "version.",
                "Removing the classic view was a mistake in my opinion."),
               ("I have used {product} for years and never had to complain before.",
                "Please bring back the old layout as an option.",
                "I hope you take this feedback into account.")),
        _Issue(("Security questionnaire", "Do you have a SOC 2 report?",
                "Vendor due diligence"),
               ("Our procurement team needs your latest SOC 2 report before we can sign.",
                "Could you fill in our vendor security questionnaire?",
                "Where can I find your data processing agreement and list of "
                "subprocessors?"),
               ("The deadline on our side is the end of next week.",
                "We are happy to sign an NDA first if you need one.",
                "Our legal team will review the documents before the contract goes ahead.")),
    ), details=(
        "This is not a support problem, just something I wanted to share.",
        "Feel free to pass this on to the product team.",
        "No rush on a reply to this one.",
    )),
}

_TICKET_WORDS: dict[str, tuple[str, ...]] = {
    "product": ("Acme Cloud", "Acme Mail", "Acme Analytics", "Acme Drive", "Acme CRM",
                "Acme Pay", "Acme Chat", "Acme Forms", "the mobile app", "the desktop app",
                "the web dashboard"),
    "plan": ("Starter", "Pro", "Team", "Business", "Enterprise"),
    "device": ("iPhone", "Android phone", "iPad", "Windows laptop", "Mac", "Chromebook"),
    "browser": ("Chrome", "Firefox", "Safari", "Edge"),
    "os": ("Windows 11", "macOS 14", "Ubuntu 22.04", "iOS 17", "Android 14"),
    "integration": ("Slack", "Salesforce", "Google Drive", "Microsoft Teams", "Zapier", "Jira",
                    "HubSpot", "Shopify", "QuickBooks"),
    "feature": ("two-factor authentication", "single sign-on", "dark mode", "auto-backup",
                "audit logs", "custom domains", "offline mode", "shared folders",
                "scheduled exports", "usage alerts", "webhooks", "version history",
                "bulk import"),
    "data": ("contacts", "invoices", "files", "reports", "dashboards", "customer records",
             "form responses", "deals"),
    "region": ("EMEA", "North America", "APAC", "LATAM", "the Nordics", "Japan"),
    "month": ("January", "February", "March"),
    "company": ("Northwind Traders", "Globex", "Initech", "Contoso", "Umbrella Labs",
                "Stark Logistics", "Wayne Media", "Hooli", "Vandelay Imports", "Pied Piper"),
}
_TICKET_PRICES = (19, 29, 49, 79, 99, 129, 199, 249, 499, 1200)


def _ticket_words(rnd: random.Random) -> dict[str, str]:
    words = {slot: rnd.choice(options) for slot, options in _TICKET_WORDS.items()}
    # plan2 is a cheaper plan than plan ("we downgraded from {plan} to {plan2}").
    plans = _TICKET_WORDS["plan"]
    lower, higher = sorted(rnd.sample(range(len(plans)), 2))
    words.update(plan=plans[higher], plan2=plans[lower])
    for slot, pool in (("device2", "device"), ("browser2", "browser")):
        words[slot] = rnd.choice([w for w in _TICKET_WORDS[pool] if w != words[pool]])
    symbol = rnd.choice("$$$€£")
    price = rnd.choice(_TICKET_PRICES)
    words["amount"] = f"{symbol}{price:,.2f}"
    words["amount2"] = f"{symbol}{price * rnd.choice((1.2, 1.5, 2)):,.2f}"
    n = rnd.randint(3, 60)
    words.update(n=str(n), n2=str(rnd.randint(1, n - 1)),
                 date=f"{words['month']} {rnd.randint(1, 28)}",
                 code=rnd.choice(("E1042", "E2210", "E3005", "403", "500", "502", "504")),
                 version=f"{rnd.randint(3, 5)}.{rnd.randint(0, 14)}.{rnd.randint(0, 9)}",
                 invoice=f"INV-2026-{rnd.randint(1000, 99999):06d}",
                 years=str(rnd.randint(2, 9)))
    # The customer writing (who signs and owns the email address) and someone else they name.
    (first, last), other = _person(rnd), _person(rnd)
    while other == (first, last):
        other = _person(rnd)
    domain = words["company"].lower().replace(" ", "") + ".example"
    words.update(first=first, last=last, name=" ".join(other),
                 email=f"{first.lower()}.{last.lower().replace(chr(39), '')}@{domain}")
    return words


_CONTEXT = (
    "We are a team of {n} people.",
    "Our workspace is called {company}.",
    "I have been a customer for {years} years.",
    "I am writing on behalf of {company}.",
    "Our account is on the {plan} plan.",
    "This affects {n} people in our {region} office.",
)
_CLOSERS = (
    "Thanks in advance.", "Any help would be appreciated.", "Thank you!",
    "Looking forward to your reply.", "Please get back to me as soon as you can.",
    "Let me know if you need anything else from me.", "Thanks for your help.",
)
_GREETINGS = ("Hi,", "Hello,", "Hi support team,", "Hello Acme support,", "Dear support team,",
              "Hi there,", "Good morning,")
_SIGNOFFS = ("Thanks,\n{first}", "Best regards,\n{first} {last}", "Cheers,\n{first}",
             "Thank you,\n{first} {last}\n{company}", "{first}", "Kind regards,\n{first} {last}")
_SUBJECT_PREFIXES = ("", "Re: ", "URGENT: ")
_NEUTRAL_POOL = 512


@dataclass
class _TicketPools:
    """Rendered texts. Core c is one ticket's subject, lead sentence, up to five details and
    sign-off, all rendered from one issue with one set of words; each category's cores are
    contiguous (`core_start[c]` on). Long attachments likewise (`long_start[c]`)."""

    subjects: pa.Array
    leads: pa.Array
    details: list[pa.Array]          # _MAX_DETAILS arrays, aligned with the cores
    signoffs: pa.Array               # aligned with the cores
    core_start: IntArray             # per category, then the total
    context: pa.Array
    closers: pa.Array
    greetings: pa.Array
    long: pa.Array
    long_start: IntArray

    @classmethod
    def build(cls, per_category: IntArray, long_per_category: IntArray,
              rnd: random.Random) -> _TicketPools:
        subjects: list[str] = []
        leads: list[str] = []
        details: list[list[str]] = [[] for _ in range(_MAX_DETAILS)]
        signoffs: list[str] = []
        core_start = [0]
        long: list[str] = []
        long_start = [0]
        for c, category in enumerate(CATEGORIES):
            bank = TICKET_BANKS[category]
            for _ in range(min(int(per_category[c]), _CORE_POOL_CAP)):
                issue = rnd.choice(bank.issues)
                words = _ticket_words(rnd)
                subjects.append(rnd.choice(issue.subjects).format(**words))
                leads.append(rnd.choice(issue.leads).format(**words))
                chosen = (rnd.sample(issue.details, len(issue.details))
                          + rnd.sample(bank.details, len(bank.details)))
                for j in range(_MAX_DETAILS):
                    details[j].append(chosen[j].format(**words))
                signoffs.append(rnd.choice(_SIGNOFFS).format(**words))
            core_start.append(len(subjects))
            for _ in range(min(int(long_per_category[c]), _LONG_POOL_CAP)):
                target = rnd.randint(*_ATTACHMENT_TARGET)
                long.append(_log_attachment(rnd, target)
                            if category == "bug" and rnd.random() < 0.6
                            else _thread_attachment(rnd, bank, rnd.choice(bank.issues),
                                                    target))
            long_start.append(len(long))

        string = pa.string()
        context = [rnd.choice(_CONTEXT).format(**_ticket_words(rnd))
                   for _ in range(_NEUTRAL_POOL)]
        return cls(subjects=pa.array(subjects, string), leads=pa.array(leads, string),
                   details=[pa.array(d, string) for d in details],
                   signoffs=pa.array(signoffs, string),
                   core_start=np.array(core_start, dtype=np.int64),
                   context=pa.array(context, string), closers=pa.array(_CLOSERS, string),
                   greetings=pa.array(_GREETINGS, string),
                   long=pa.array(long, string), long_start=np.array(long_start, np.int64))


_LOG_COMPONENTS = ("api-gateway", "sync-worker-2", "sync-worker-3", "auth", "scheduler",
                   "export-service", "db-pool", "web-ui", "notifier")
_LOG_RESOURCES = ("records", "contacts", "files", "reports", "sessions", "exports", "webhooks")
_LOG_MESSAGES = {
    "DEBUG": ("cache lookup key=rec:{id} hit={bool}", "loaded {n} settings for workspace {ws}",
              "socket keepalive sent to {host}"),
    "INFO": ("GET /api/v2/{res}?page={n} 200 in {ms} ms", "POST /api/v2/{res} 201 in {ms} ms",
             "sync batch {id} started ({n} records)", "user {uid} opened /{res}/{id}",
             "job export-{id} queued for workspace {ws}"),
    "WARN": ("slow query on {res} took {ms} ms", "retrying request to {host} (attempt {a}/5)",
             "rate limit at 80% for workspace {ws}", "payload for {res} truncated at 1 MB"),
    "ERROR": ("upstream timed out after 30000 ms (GET /api/v2/{res})",
              "sync batch {id} failed: 409 Conflict on {res}/{uid}",
              "unhandled exception in /{res}: TypeError: Cannot read properties of undefined "
              "(reading 'id')",
              "connection reset by peer ({host}:5432)"),
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")
_LOG_LEVEL_WEIGHTS = (0.1, 0.65, 0.15, 0.1)
_LOG_INTROS = ("Here is the full log from this morning:", "Pasting the console output below.",
               "The log from the last run is below, in case it helps.")


def _log_attachment(rnd: random.Random, target: int) -> str:
    """A pasted application log: timestamped lines, now and then a stack trace."""
    clock = dt.datetime(2026, 3, 2, rnd.randint(6, 10), rnd.randint(0, 59), tzinfo=dt.UTC)

    def line() -> str:
        nonlocal clock
        clock += dt.timedelta(milliseconds=rnd.randint(1, 4000))
        level = rnd.choices(_LOG_LEVELS, _LOG_LEVEL_WEIGHTS)[0]
        message = rnd.choice(_LOG_MESSAGES[level]).format(
            id=f"{rnd.getrandbits(32):08x}", n=rnd.randint(1, 500), ms=rnd.randint(3, 30000),
            res=rnd.choice(_LOG_RESOURCES), uid=rnd.randint(1000, 99999),
            ws=f"ws-{rnd.randint(100, 999)}", bool=rnd.choice(("true", "false")),
            host=f"10.0.{rnd.randint(0, 9)}.{rnd.randint(2, 250)}", a=rnd.randint(1, 5))
        text = (f"{clock:%Y-%m-%dT%H:%M:%S}.{clock.microsecond // 1000:03d}Z {level:<5} "
                f"[{rnd.choice(_LOG_COMPONENTS)}] {message}")
        if level == "ERROR" and rnd.random() < 0.3:
            text += "".join(f"\n    at {rnd.choice(('handleRequest', 'syncBatch', 'render'))} "
                            f"(app.js:{rnd.randint(10, 9000)}:{rnd.randint(1, 80)})"
                            for _ in range(rnd.randint(3, 8)))
        return text

    return _stop_past(target, line, rnd.choice(_LOG_INTROS) + "\n\n```") + "\n```"


_AGENT_SENTENCES = (
    "Thank you for contacting Acme support.",
    "Could you send us a few more details so we can investigate?",
    "We have passed this on to the relevant team.",
    "Sorry for the trouble this is causing.",
    "Could you send us the exact time this happened, with your time zone?",
    "We are still looking into it and will update you as soon as we know more.",
    "Is there anything else we can help with in the meantime?",
    "I have added your case to our internal ticket.",
)
_DISCLAIMER = (
    "This e-mail and any attachments are confidential and intended solely for the addressee. "
    "If you have received it in error, please notify the sender and delete it. Any views "
    "expressed are those of the author and do not necessarily represent those of {company}.")
_THREAD_INTROS = ("I am forwarding the whole thread below so you have the history.",
                  "Our earlier emails about this are below.",
                  "See the previous messages below.")


def _thread_attachment(rnd: random.Random, bank: TicketBank, issue: _Issue,
                       target: int) -> str:
    """A quoted email thread: the customer and support going back and forth, oldest last,
    about one issue (and one set of words: the same customer, product, plan...)."""
    sentences = (*issue.leads, *issue.details, *bank.details)
    words = _ticket_words(rnd)
    first, last, email = words["first"], words["last"], words["email"]
    clock = dt.datetime(2026, 3, 1, 17, 0, tzinfo=dt.UTC)

    def message() -> str:
        nonlocal clock
        clock -= dt.timedelta(minutes=rnd.randint(30, 3000))
        if rnd.random() < 0.5:
            sender = "Acme Support <support@acme.example>"
            lines = [" ".join(rnd.sample(_AGENT_SENTENCES, rnd.randint(2, 4))), "",
                     "Best regards,", "Acme Support"]
        else:
            sender = f"{first} {last} <{email}>"
            body = " ".join(rnd.choice(sentences).format(**words)
                            for _ in range(rnd.randint(2, 5)))
            lines = [body, "", f"{first} {last}", words["company"]]
            if rnd.random() < 0.5:
                lines += ["", _DISCLAIMER.format(company=words["company"])]
        header = f"On {clock:%a, %d %b %Y at %H:%M}, {sender} wrote:"
        return "\n".join([header, *(f"> {text}".rstrip() for text in lines)]) + "\n"

    return _stop_past(target, message, rnd.choice(_THREAD_INTROS) + "\n")


@dataclass
class _TicketPlan:
    """Per row, indices into the pools; -1 where a part is absent."""

    category: IntArray
    core: IntArray
    details: IntArray       # how many detail sentences (0-5)
    paragraph: BoolArray    # the third detail starts a new paragraph
    context: IntArray
    closer: IntArray
    greeting: IntArray
    signoff: BoolArray      # the core's sign-off closes the body
    prefix: IntArray        # into _SUBJECT_PREFIXES
    long: IntArray
    null: BoolArray
    priority: IntArray
    tier: IntArray

    @classmethod
    def draw(cls, category: IntArray, shape: IntArray, pools: _TicketPools,
             rng: np.random.Generator) -> _TicketPlan:
        n = len(category)
        core = np.zeros(n, dtype=np.int64)
        long = np.full(n, -1, dtype=np.int64)
        priority = np.zeros(n, dtype=np.int64)
        for c, name in enumerate(CATEGORIES):
            rows = np.flatnonzero(category == c)
            start, end = pools.core_start[c], pools.core_start[c + 1]
            core[rows] = start + _draw(rng, int(end - start), len(rows))
            priority[rows] = rng.choice(len(PRIORITIES), size=len(rows),
                                        p=_PRIORITY_SHARES[name])
            long_rows = rows[shape[rows] == _LONG]
            start, end = pools.long_start[c], pools.long_start[c + 1]
            long[long_rows] = start + _draw(rng, int(end - start), len(long_rows))
        details = rng.choice(_MAX_DETAILS + 1, size=n, p=[0.08, 0.25, 0.27, 0.2, 0.12, 0.08])
        context = _sometimes(rng, n, 0.35, len(pools.context))
        closer = _sometimes(rng, n, 0.55, len(pools.closers))
        # Every body has at least two sentences: the lead and one more.
        details[(details == 0) & (context < 0) & (closer < 0)] = 1
        urgent = priority == PRIORITIES.index("urgent")
        prefix = np.where(rng.random(n) < 0.06, 1, 0)
        prefix[urgent & (rng.random(n) < 0.35)] = 2
        return cls(category=category, core=core, details=details.astype(np.int64),
                   paragraph=(details >= 3) & (rng.random(n) < 0.5), context=context,
                   closer=closer, greeting=_sometimes(rng, n, 0.75, len(pools.greetings)),
                   signoff=rng.random(n) < 0.8,
                   prefix=prefix.astype(np.int64), long=long, null=shape == _NULL,
                   priority=priority,
                   tier=rng.choice(len(TIERS), size=n, p=TIER_SHARES).astype(np.int64))


def _sometimes(rng: np.random.Generator, n: int, p: float, pool_size: int) -> IntArray:
    """Per row, an index into a pool with probability p, else -1."""
    index = rng.integers(0, pool_size, size=n, dtype=np.int64)
    return np.where(rng.random(n) < p, index, -1)


def _ticket_ids_and_times(rows: int, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
    """Increasing ids with gaps (tickets of other queues, deleted spam), and sorted creation
    times in microseconds, weighted towards office hours."""
    ids = (TICKET_ID_START + int(rng.integers(0, 5_000))
           + np.cumsum(1 + rng.poisson(0.6, size=rows)))
    hour_us, day_us = 3_600_000_000, 86_400_000_000
    start_us = int(_TICKET_START.timestamp()) * 1_000_000
    times = (start_us + rng.integers(0, _TICKET_DAYS, size=rows) * day_us
             + rng.choice(24, size=rows, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum()) * hour_us
             + rng.integers(0, hour_us, size=rows))
    return ids.astype(np.int64), np.sort(times).astype(np.int64)


def _materialise_tickets(plan: _TicketPlan, pools: _TicketPools, ticket_id: IntArray,
                         created_at: IntArray) -> pa.Table:
    categories = pa.array(CATEGORIES, pa.string())
    priorities = pa.array(PRIORITIES, pa.string())
    tiers = pa.array(TIERS, pa.string())
    prefixes = pa.array(_SUBJECT_PREFIXES, pa.string())
    null_text = pa.scalar(None, pa.string())
    batches = []
    for start in range(0, len(plan.core), CHUNK_ROWS):
        part = slice(start, start + CHUNK_ROWS)
        core = plan.core[part]
        details = plan.details[part]
        detail_parts = [_take(pools.details[j], core, details <= j)
                        for j in range(_MAX_DETAILS)]
        detail_parts[2] = pc.if_else(pa.array(plan.paragraph[part]),
                                     _concat("\n\n", detail_parts[2]), detail_parts[2])
        context, closer = plan.context[part], plan.closer[part]
        prose = _join([_take(pools.leads, core), _take(pools.context, context, context < 0),
                       *detail_parts, _take(pools.closers, closer, closer < 0)], " ")
        prose = pc.replace_substring(prose, " \n\n", "\n\n")
        greeting = plan.greeting[part]
        body = _join([prose, _take(pools.signoffs, core, ~plan.signoff[part])], "\n\n")
        body = pc.if_else(pa.array(greeting >= 0),
                          _join([_take(pools.greetings, np.maximum(greeting, 0)), body],
                                "\n\n"),
                          body)
        long = plan.long[part]
        body = _join([body, _take(pools.long, long, long < 0)], "\n\n")
        body = pc.if_else(pa.array(plan.null[part]), null_text, body)
        subject = _concat(_take(prefixes, plan.prefix[part]), _take(pools.subjects, core))
        batches.append(pa.record_batch([
            pa.array(ticket_id[part], pa.int64()),
            subject,
            body,
            _take(priorities, plan.priority[part]),
            _take(tiers, plan.tier[part]),
            pa.array(created_at[part], pa.timestamp("us", tz="UTC")),
            _take(categories, plan.category[part]),
        ], schema=TICKETS_SCHEMA))
    return pa.Table.from_batches(batches, schema=TICKETS_SCHEMA)


# --------------------------------------------------------------------------------------------
# Invoices


CURRENCIES = ("USD", "EUR", "GBP")
CURRENCY_SHARES = (0.60, 0.25, 0.15)
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£"}


@dataclass(frozen=True)
class _Item:
    description: str
    price: tuple[int, int, int]   # unit price low, high, step, in cents
    quantity: tuple[int, int]     # low, high; small quantities are likelier


def _items(*rows: tuple[str, int, int, int, int, int]) -> tuple[_Item, ...]:
    return tuple(_Item(d, (lo, hi, step), (qlo, qhi)) for d, lo, hi, step, qlo, qhi in rows)


_ITEMS_PER_TRADE = 8
_TRADES: dict[str, tuple[_Item, ...]] = {
    "software": _items(
        ("Platform subscription, Team tier (monthly)", 4900, 49900, 100, 1, 1),
        ("Additional user seats", 900, 2900, 100, 1, 60),
        ("Premium support add-on", 9900, 29900, 100, 1, 1),
        ("API usage overage (per 10k calls)", 150, 900, 5, 1, 400),
        ("Data storage (per 100 GB)", 400, 2500, 5, 1, 40),
        ("Onboarding and setup", 50000, 250000, 5000, 1, 1),
        ("Single sign-on module", 19900, 59900, 100, 1, 1),
        ("Sandbox environment", 9900, 19900, 100, 1, 2)),
    "consulting": _items(
        ("Consulting hours - senior consultant", 15000, 28000, 500, 1, 80),
        ("Consulting hours - analyst", 8000, 14000, 500, 1, 120),
        ("Workshop facilitation (full day)", 120000, 350000, 5000, 1, 3),
        ("Travel expenses", 15000, 120000, 1, 1, 1),
        ("Project management", 9000, 16000, 500, 1, 40),
        ("Requirements analysis", 11000, 18000, 500, 2, 30),
        ("Final report and presentation", 150000, 500000, 10000, 1, 1),
        ("Out-of-hours support", 12000, 20000, 500, 1, 10)),
    "office": _items(
        ("A4 copier paper, 5-ream box", 2199, 3999, 1, 1, 40),
        ("Black toner cartridge", 4500, 12900, 1, 1, 10),
        ("Ergonomic office chair", 18900, 54900, 100, 1, 12),
        ("Standing desk, 160 x 80 cm", 39900, 89900, 100, 1, 8),
        ("Whiteboard markers, pack of 12", 899, 1899, 1, 1, 20),
        ("USB-C docking station", 12900, 27900, 100, 1, 15),
        ("27-inch monitor", 19900, 44900, 100, 1, 10),
        ("Delivery charge", 995, 4995, 5, 1, 1)),
    "logistics": _items(
        ("Pallet freight, standard service", 8500, 32000, 50, 1, 24),
        ("Express courier, same day", 3500, 14000, 50, 1, 10),
        ("Warehouse storage (per pallet per week)", 600, 1800, 10, 4, 200),
        ("Customs clearance fee", 4500, 15000, 500, 1, 3),
        ("Fuel surcharge", 1200, 9000, 1, 1, 1),
        ("Pick and pack (per order)", 180, 650, 5, 20, 900),
        ("Insurance on goods in transit", 2500, 20000, 1, 1, 1),
        ("Return shipment", 2200, 9000, 50, 1, 6)),
    "catering": _items(
        ("Lunch buffet (per person)", 1450, 3200, 50, 8, 120),
        ("Coffee and pastries (per person)", 650, 1400, 50, 8, 120),
        ("Canape reception (per person)", 1800, 4500, 50, 10, 150),
        ("Vegetarian lunch boxes", 1100, 1900, 50, 5, 60),
        ("Waiting staff (per hour)", 2800, 4500, 50, 4, 40),
        ("Equipment hire", 5000, 30000, 500, 1, 1),
        ("Soft drinks, crate of 24", 2400, 3900, 10, 1, 10),
        ("Delivery and setup", 4000, 12000, 500, 1, 1)),
    "legal": _items(
        ("Legal services - partner (hours)", 35000, 65000, 1000, 1, 20),
        ("Legal services - associate (hours)", 18000, 30000, 1000, 1, 40),
        ("Contract review", 60000, 250000, 5000, 1, 2),
        ("Trademark filing fee", 25000, 60000, 1000, 1, 3),
        ("Court filing fee", 15000, 45000, 500, 1, 2),
        ("Courier and disbursements", 1500, 9000, 1, 1, 1),
        ("Company secretarial services", 30000, 90000, 1000, 1, 1),
        ("Due diligence report", 200000, 900000, 10000, 1, 1)),
    "cleaning": _items(
        ("Office cleaning, weekly contract (monthly)", 90000, 320000, 500, 1, 1),
        ("Window cleaning", 12000, 45000, 500, 1, 2),
        ("Carpet deep clean (per room)", 6000, 14000, 500, 1, 20),
        ("Washroom supplies", 4000, 25000, 1, 1, 1),
        ("Deep clean after office move", 60000, 180000, 1000, 1, 1),
        ("Waste removal", 8000, 30000, 500, 1, 4),
        ("Kitchen cleaning (per visit)", 3500, 7000, 500, 1, 22),
        ("Emergency call-out", 15000, 30000, 1000, 1, 2)),
    "marketing": _items(
        ("Social media campaign management", 150000, 600000, 5000, 1, 1),
        ("Paid search management fee", 80000, 300000, 5000, 1, 1),
        ("Landing page design", 120000, 450000, 5000, 1, 2),
        ("Copywriting (per 1,000 words)", 9000, 25000, 500, 1, 20),
        ("Photography, half day", 45000, 120000, 5000, 1, 2),
        ("Brand guidelines document", 200000, 800000, 10000, 1, 1),
        ("Email newsletter production", 30000, 90000, 1000, 1, 4),
        ("Ad spend (passed through at cost)", 50000, 1500000, 1, 1, 1)),
    "print": _items(
        ("Business cards, box of 500", 2900, 6900, 10, 1, 20),
        ("Brochures, A4 tri-fold (per 1,000)", 18000, 42000, 100, 1, 10),
        ("Roll-up banner", 8900, 19900, 100, 1, 6),
        ("Posters, A2 (per 100)", 9500, 22000, 100, 1, 10),
        ("Letterheads (per 1,000)", 7500, 16000, 100, 1, 5),
        ("Design proof and setup", 4500, 15000, 500, 1, 1),
        ("Envelopes, DL (per 500)", 2500, 6000, 10, 1, 10),
        ("Delivery", 900, 4500, 5, 1, 1)),
    "staffing": _items(
        ("Temporary receptionist (hours)", 2200, 3800, 25, 8, 160),
        ("Temporary warehouse operative (hours)", 1900, 3200, 25, 8, 320),
        ("Contract software developer (days)", 45000, 90000, 1000, 1, 22),
        ("Permanent placement fee", 500000, 1800000, 10000, 1, 1),
        ("Overtime hours", 2800, 5200, 25, 1, 40),
        ("Background checks", 3500, 9000, 500, 1, 12),
        ("Timesheet administration", 2500, 9000, 500, 1, 1),
        ("Weekend premium (hours)", 900, 1800, 25, 4, 48)),
    "translation": _items(
        ("Translation EN-DE (per 1,000 words)", 9000, 16000, 500, 1, 40),
        ("Translation EN-FR (per 1,000 words)", 9000, 16000, 500, 1, 40),
        ("Translation EN-ES (per 1,000 words)", 8500, 15000, 500, 1, 40),
        ("Proofreading (per hour)", 4500, 7500, 500, 1, 20),
        ("Certified translation, per page", 3500, 6500, 500, 1, 30),
        ("Glossary creation", 25000, 60000, 1000, 1, 1),
        ("Rush surcharge", 5000, 40000, 1, 1, 1),
        ("Interpreting, half day", 40000, 90000, 1000, 1, 3)),
    "coffee": _items(
        ("Espresso beans, 1 kg", 1800, 3400, 10, 1, 40),
        ("Filter coffee, 1 kg", 1400, 2600, 10, 1, 30),
        ("Coffee machine rental (monthly)", 6900, 24900, 100, 1, 2),
        ("Oat drink, 1 l", 180, 320, 1, 6, 96),
        ("Paper cups, pack of 1,000", 3900, 8900, 10, 1, 10),
        ("Descaling service", 4500, 12000, 500, 1, 2),
        ("Tea selection box", 1200, 2900, 10, 1, 12),
        ("Delivery", 500, 2500, 5, 1, 1)),
}
assert all(len(items) == _ITEMS_PER_TRADE for items in _TRADES.values())


@dataclass(frozen=True)
class Vendor:
    name: str
    trade: str
    currency: str
    tax_rate: int      # in thousandths of a percent: 8875 is 8.875%
    address: str
    bank: str


VENDORS: tuple[Vendor, ...] = (
    Vendor("Bluefin Analytics LLC", "software", "USD", 0,
           "1200 Pine Street, Suite 400, Seattle, WA 98101", "ACH routing 125000024"),
    Vendor("Northstar IT Solutions Inc.", "consulting", "USD", 0,
           "88 State Street, Boston, MA 02109", "ACH routing 011000138"),
    Vendor("Summit Office Supply Co.", "office", "USD", 8875,
           "415 West 34th Street, New York, NY 10001", "ACH routing 021000089"),
    Vendor("Redwood Freight Partners", "logistics", "USD", 0,
           "2300 Harbor Way, Oakland, CA 94607", "ACH routing 121000358"),
    Vendor("Lakeside Catering Co.", "catering", "USD", 10250,
           "19 Lakeshore Drive, Chicago, IL 60611", "ACH routing 071000013"),
    Vendor("Granite Peak Legal LLP", "legal", "USD", 0,
           "700 17th Street, Denver, CO 80202", "ACH routing 102000021"),
    Vendor("Tidewater Janitorial Services", "cleaning", "USD", 6000,
           "51 Ocean Avenue, Norfolk, VA 23510", "ACH routing 051000017"),
    Vendor("Copperleaf Marketing Group", "marketing", "USD", 0,
           "1410 Congress Avenue, Austin, TX 78701", "ACH routing 111000025"),
    Vendor("Pinnacle Print Works", "print", "USD", 8625,
           "960 Mission Street, San Francisco, CA 94103", "ACH routing 121000248"),
    Vendor("Silverline Staffing LLC", "staffing", "USD", 0,
           "300 Peachtree Street NE, Atlanta, GA 30308", "ACH routing 061000104"),
    Vendor("Quartz Data Systems Inc.", "software", "USD", 7250,
           "55 Innovation Way, Raleigh, NC 27601", "ACH routing 053000196"),
    Vendor("Nordlicht Software GmbH", "software", "EUR", 19000,
           "Torstrasse 140, 10119 Berlin, Germany", "IBAN DE89 3704 0044 0532 0130 00"),
    Vendor("Atelier Moreau SARL", "print", "EUR", 20000,
           "12 rue de la Roquette, 75011 Paris, France", "IBAN FR76 3000 6000 0112 3456 7890 189"),
    Vendor("Van Dijk Logistiek B.V.", "logistics", "EUR", 21000,
           "Keizersgracht 221, 1016 DV Amsterdam, Netherlands", "IBAN NL91 ABNA 0417 1643 00"),
    Vendor("Buerotechnik Schneider GmbH", "office", "EUR", 19000,
           "Hauptstrasse 18, 70173 Stuttgart, Germany", "IBAN DE44 5001 0517 5407 3249 31"),
    Vendor("Studio Ferraro S.r.l.", "marketing", "EUR", 22000,
           "Via Tortona 27, 20144 Milano, Italy", "IBAN IT60 X054 2811 1010 0000 0123 456"),
    Vendor("Iberia Traducciones S.L.", "translation", "EUR", 21000,
           "Calle de Alcala 95, 28009 Madrid, Spain", "IBAN ES91 2100 0418 4502 0005 1332"),
    Vendor("Kaffeeroesterei Weber KG", "coffee", "EUR", 7000,
           "Schanzenstrasse 56, 20357 Hamburg, Germany", "IBAN DE02 2005 0550 1234 5678 90"),
    Vendor("Helsinki Design Oy", "consulting", "EUR", 25500,
           "Mannerheimintie 12, 00100 Helsinki, Finland", "IBAN FI21 1234 5600 0007 85"),
    Vendor("Thames Valley IT Ltd", "consulting", "GBP", 20000,
           "Unit 4, Kings Meadow, Reading RG1 8DG", "Sort code 20-00-00, account 55779911"),
    Vendor("Ashford & Clarke Solicitors LLP", "legal", "GBP", 20000,
           "22 Bedford Row, London WC1R 4JS", "Sort code 40-11-62, account 21873040"),
    Vendor("Pennine Print Ltd", "print", "GBP", 20000,
           "Mill Lane, Halifax HX1 3AA", "Sort code 30-94-57, account 11223344"),
    Vendor("Brightwater Recruitment Ltd", "staffing", "GBP", 20000,
           "9 Queen Street, Edinburgh EH2 1JQ", "Sort code 83-91-20, account 60161331"),
    Vendor("Kestrel Cleaning Services Ltd", "cleaning", "GBP", 20000,
           "45 Corporation Street, Birmingham B2 4LP", "Sort code 60-16-13, account 31926819"),
    Vendor("Oakridge Catering Ltd", "catering", "GBP", 20000,
           "3 Albert Square, Manchester M2 5DB", "Sort code 09-01-28, account 44556677"),
)

# Who the invoices are addressed to: the group's entity in each currency.
_BILL_TO = {
    "USD": ("Acme Corp", "Attn: Accounts Payable", "500 Market Street, San Francisco, CA 94105"),
    "EUR": ("Acme Europe B.V.", "Attn: Crediteurenadministratie",
            "Zuidplein 36, 1077 XV Amsterdam, Netherlands"),
    "GBP": ("Acme UK Ltd", "Attn: Accounts Payable", "1 Canada Square, London E14 5AB"),
}
_TERMS = ((0, "Due on receipt"), (14, "Net 14"), (30, "Net 30"), (45, "Net 45"),
          (60, "Net 60"))
_TERM_SHARES = (0.1, 0.2, 0.5, 0.1, 0.1)
_ISSUE_START = dt.date(2026, 1, 5)
_ISSUE_DAYS = 85
_DATE_DAYS = _ISSUE_DAYS + max(days for days, _ in _TERMS)
_DATE_STYLES: tuple[Callable[[dt.date], str], ...] = (
    lambda d: d.isoformat(),                          # 0: 2026-03-04
    lambda d: f"{d:%B} {d.day}, {d.year}",            # 1: March 4, 2026
    lambda d: f"{d.day} {d:%B} {d.year}",             # 2: 4 March 2026
    lambda d: f"{d:%m/%d/%Y}",                        # 3: 03/04/2026
    lambda d: f"{d:%d.%m.%Y}",                        # 4: 04.03.2026
    lambda d: f"{d:%d/%m/%Y}",                        # 5: 04/03/2026
)
# Per layout, the date style for each currency (USD, EUR, GBP).
_LAYOUT_DATE_STYLE = ((0, 0, 0), (1, 2, 2), (3, 4, 5))
_LAYOUT_SHARES = (0.4, 0.35, 0.25)
_ITEM_COUNT_SHARES = (0.3, 0.25, 0.18, 0.12, 0.09, 0.06)
_MAX_ITEMS = len(_ITEM_COUNT_SHARES)
_PO_FRACTION = 0.4

_EMAIL_GREETINGS = ("Hello {team},", "Dear {team},", "Hi {customer} team,",
                    "Dear Sir or Madam,", "Good afternoon,")
_EMAIL_INTROS = (" for the work delivered this month.", ". Thank you for your business!",
                 " as agreed.", " for your records.", ", covering the items listed below.")
_EMAIL_PAYMENT = (
    "Please quote the invoice number with your payment.",
    "Payment by bank transfer is preferred; our details are below.",
    "Let us know if anything on this invoice looks wrong.",
    "Late payments may incur interest at 1.5% per month.",
)
@dataclass
class _InvoicePlan:
    """Per row, in invoice_id order: amounts in whole cents, items as (row, slot) arrays."""

    sequence: IntArray   # the number in invoice_id
    vendor: IntArray
    layout: IntArray
    n_items: IntArray
    item: IntArray       # (rows, _MAX_ITEMS): flat index into _ALL_ITEMS
    quantity: IntArray   # (rows, _MAX_ITEMS); 0 past n_items
    unit: IntArray       # (rows, _MAX_ITEMS) cents
    subtotal: IntArray
    tax: IntArray
    issue_day: IntArray  # days after _ISSUE_START
    terms: IntArray      # into _TERMS
    po: IntArray         # purchase order number, -1 for none
    shape: IntArray

    @property
    def total(self) -> IntArray:
        return self.subtotal + self.tax

    @classmethod
    def draw(cls, rows: int, rng: np.random.Generator) -> _InvoicePlan:
        currency = rng.choice(len(CURRENCIES), size=rows, p=CURRENCY_SHARES)
        vendor = np.zeros(rows, dtype=np.int64)
        for c, code in enumerate(CURRENCIES):
            mine = np.array([v for v, vendor_ in enumerate(VENDORS) if vendor_.currency == code])
            where = np.flatnonzero(currency == c)
            vendor[where] = mine[rng.integers(0, len(mine), size=len(where))]
        n_items = 1 + rng.choice(_MAX_ITEMS, size=rows, p=_ITEM_COUNT_SHARES)
        # Distinct items within an invoice: the first slots of a random order of the trade's.
        slot = np.argsort(rng.random((rows, _ITEMS_PER_TRADE)), axis=1)[:, :_MAX_ITEMS]
        item = _VENDOR_TRADE[vendor][:, None] * _ITEMS_PER_TRADE + slot
        present = np.arange(_MAX_ITEMS)[None, :] < n_items[:, None]
        low, high, step = _PRICE[item, 0], _PRICE[item, 1], _PRICE[item, 2]
        unit = low + rng.integers(0, (high - low) // step + 1) * step
        q_low, q_high = _QUANTITY[item, 0], _QUANTITY[item, 1]
        quantity = q_low + np.floor(rng.random(item.shape) ** 2
                                    * (q_high - q_low + 1)).astype(np.int64)
        quantity = np.where(present, quantity, 0)
        subtotal = (quantity * unit).sum(axis=1)
        tax = (subtotal * _TAX_RATE[vendor] + 50_000) // 100_000  # half up, exact
        sequence = (1_000 + int(rng.integers(0, 4_000))
                    + np.cumsum(1 + rng.poisson(0.5, size=rows)))
        return cls(sequence=sequence.astype(np.int64), vendor=vendor,
                   layout=rng.choice(len(_LAYOUT_SHARES), size=rows,
                                     p=_LAYOUT_SHARES).astype(np.int64),
                   n_items=n_items.astype(np.int64), item=item.astype(np.int64),
                   quantity=quantity.astype(np.int64), unit=unit.astype(np.int64),
                   subtotal=subtotal.astype(np.int64), tax=tax.astype(np.int64),
                   issue_day=np.sort(rng.integers(0, _ISSUE_DAYS, size=rows)).astype(np.int64),
                   terms=rng.choice(len(_TERMS), size=rows, p=_TERM_SHARES).astype(np.int64),
                   po=np.where(rng.random(rows) < _PO_FRACTION,
                               rng.integers(10_000, 100_000, size=rows), -1).astype(np.int64),
                   shape=_shapes(rng, rows, NULL_TEXT_FRACTION, LONG_TEXT_FRACTION))

    def rows(self, index: IntArray) -> _InvoicePlan:
        return _InvoicePlan(*(getattr(self, name)[index] for name in _INVOICE_FIELDS))


_INVOICE_FIELDS = tuple(_InvoicePlan.__dataclass_fields__)
_ALL_ITEMS = tuple(item for items in _TRADES.values() for item in items)
_TRADE_NAMES = tuple(_TRADES)
_VENDOR_TRADE = np.array([_TRADE_NAMES.index(v.trade) for v in VENDORS], dtype=np.int64)
_VENDOR_CURRENCY = np.array([CURRENCIES.index(v.currency) for v in VENDORS], dtype=np.int64)
_TAX_RATE = np.array([v.tax_rate for v in VENDORS], dtype=np.int64)
_PRICE = np.array([item.price for item in _ALL_ITEMS], dtype=np.int64)
_QUANTITY = np.array([item.quantity for item in _ALL_ITEMS], dtype=np.int64)


def _percent(rate: int) -> str:
    """8875 -> '8.875%', 19000 -> '19%'."""
    whole, frac = divmod(rate, 1000)
    return f"{whole}.{frac:03d}".rstrip("0").rstrip(".") + "%"


@dataclass
class _InvoicePools:
    """Per-vendor strings (index = vendor), dates (index = style * _DATE_DAYS + day) and the
    long attachments."""

    vendor: pa.Array
    address: pa.Array
    bank: pa.Array
    tax_a: pa.Array          # "Tax (8.875%)"
    tax_b: pa.Array          # "Sales tax (8.875%)" / "VAT (20%)"
    tax_c: pa.Array          # "Sales tax 8.875%" / "VAT 20%"
    code: pa.Array           # currency code
    symbol: pa.Array
    bill_to: pa.Array        # three lines
    bill_to_line: pa.Array   # one line
    greetings: pa.Array      # per vendor x greeting
    contacts: pa.Array       # per vendor x contact: "First Last"
    dates: pa.Array
    descriptions: pa.Array   # _ALL_ITEMS
    long: pa.Array           # statements of account

    @classmethod
    def build(cls, n_long: int, rnd: random.Random) -> _InvoicePools:
        def strings(values: Iterable[str]) -> pa.Array:
            return pa.array(list(values), pa.string())

        def tax_label(v: Vendor) -> str:
            return "Sales tax" if v.currency == "USD" else "VAT"

        bill_to = [_BILL_TO[v.currency] for v in VENDORS]
        greetings = []
        for v in VENDORS:
            customer, attn, _ = _BILL_TO[v.currency]
            team = "Accounts Payable team" if "Payable" in attn else f"{customer} finance team"
            greetings += [g.format(team=team, customer=customer.split(" ")[0])
                          for g in _EMAIL_GREETINGS]
        contacts = [" ".join(_person(rnd)) for _ in range(len(VENDORS) * _CONTACTS)]
        dates = [style(_ISSUE_START + dt.timedelta(days=day))
                 for style in _DATE_STYLES for day in range(_DATE_DAYS)]
        long = [_statement_attachment(rnd, rnd.randint(*_ATTACHMENT_TARGET))
                for _ in range(min(n_long, _LONG_POOL_CAP))]
        return cls(
            vendor=strings(v.name for v in VENDORS), address=strings(v.address for v in VENDORS),
            bank=strings(v.bank for v in VENDORS),
            tax_a=strings(f"Tax ({_percent(v.tax_rate)})" for v in VENDORS),
            tax_b=strings(f"{tax_label(v)} ({_percent(v.tax_rate)})" for v in VENDORS),
            tax_c=strings(f"{tax_label(v)} {_percent(v.tax_rate)}" for v in VENDORS),
            code=strings(v.currency for v in VENDORS),
            symbol=strings(_SYMBOLS[v.currency] for v in VENDORS),
            bill_to=strings("\n".join(b) for b in bill_to),
            bill_to_line=strings(f"{b[0]}, {b[2]}" for b in bill_to),
            greetings=strings(greetings), contacts=strings(contacts), dates=strings(dates),
            descriptions=strings(item.description for item in _ALL_ITEMS), long=strings(long))


def _statement_attachment(rnd: random.Random, target: int) -> str:
    """The vendor's statement of account, pasted under the invoice: a year of earlier
    invoices and payments with a running balance, every line an amount that is not the
    total."""
    day = dt.date(2025, 1, 2)
    balance = 0
    open_invoices: list[tuple[str, int]] = []
    number = rnd.randint(100, 900)

    def line() -> str:
        nonlocal day, balance, number
        # About three entries a day: the longest statement (~650 lines) ends in 2025.
        day += dt.timedelta(days=int(rnd.random() < 0.35))
        if open_invoices and rnd.random() < 0.45:
            reference, cents = open_invoices.pop(0)
            balance -= cents
            entry = (f"Payment received, {reference}", "", cents)
        else:
            number += rnd.randint(1, 3)
            reference = f"INV-2025-{number:06d}"
            cents = round(rnd.lognormvariate(11, 1.2)) + rnd.randint(0, 99)
            open_invoices.append((reference, cents))
            balance += cents
            entry = (f"Invoice {reference}", f"{cents / 100:,.2f}", 0)
        text, debit, credit = entry
        return (f"{day.isoformat()}  {text:<36}{debit:>14}"
                f"{(f'{credit / 100:,.2f}' if credit else ''):>14}{balance / 100:>16,.2f}")

    header = ("STATEMENT OF ACCOUNT\nAll activity since 1 January 2025, in the currency of "
              "this invoice.\n\n" + f"{'Date':<12}{'Reference':<36}{'Debit':>14}"
              f"{'Credit':>14}{'Balance':>16}")
    return _stop_past(target, line, header)


_CONTACTS = 3  # people who send a vendor's invoices
_A_WIDTHS = (46, 6, 14, 14)  # description, quantity, unit price, amount
_A_RULE = "-" * sum(_A_WIDTHS)


def _money(cents: IntArray, thousands: str, decimal: str) -> pa.Array:
    """Whole cents as '1,234.56' (or '1.234,56'), without a currency."""
    whole, frac = np.divmod(cents, 100)
    millions, rest = np.divmod(whole, 1_000_000)
    thousands_, units = np.divmod(rest, 1000)

    def text(values: IntArray, width: int = 0) -> pa.Array:
        out = pc.cast(pa.array(values, pa.int64()), pa.string())
        return pc.utf8_lpad(out, width=width, padding="0") if width else out

    grouped = pc.if_else(
        pa.array(millions > 0),
        _join([text(millions), text(thousands_, 3), text(units, 3)], thousands),
        pc.if_else(pa.array(thousands_ > 0),
                   _join([text(thousands_), text(units, 3)], thousands), text(units)))
    return _join([grouped, text(frac, 2)], decimal)


def _materialise_invoices(plan: _InvoicePlan, pools: _InvoicePools,
                          rng: np.random.Generator) -> pa.Table:
    long_index = np.full(len(plan.vendor), -1, dtype=np.int64)
    long_rows = np.flatnonzero(plan.shape == _LONG)
    long_index[long_rows] = _draw(rng, len(pools.long), len(long_rows))
    greeting = rng.integers(0, len(_EMAIL_GREETINGS), size=len(plan.vendor))
    extra = rng.integers(0, 1 << 30, size=len(plan.vendor))  # picks the small choices per row
    batches = []
    codes = pa.array(CURRENCIES, pa.string())
    null_text = pa.scalar(None, pa.string())
    for start in range(0, len(plan.vendor), CHUNK_ROWS):
        part = np.arange(start, min(start + CHUNK_ROWS, len(plan.vendor)))
        chunk = plan.rows(part)
        texts = []
        order = []
        for layout, render in enumerate(_LAYOUTS):
            mine = np.flatnonzero(chunk.layout == layout)
            if len(mine):
                texts.append(render(chunk.rows(mine), pools, greeting[part][mine],
                                    extra[part][mine]))
                order.append(mine)
        if texts:
            text = pa.concat_arrays(texts).take(pa.array(np.argsort(np.concatenate(order))))
        else:
            text = pa.array([], pa.string())
        long = long_index[part]
        text = _join([text, _take(pools.long, long, long < 0)], "\n\n")
        missing = pa.array(chunk.shape == _NULL)
        total = chunk.total
        batches.append(pa.record_batch([
            _invoice_id(chunk),
            _take(pools.vendor, chunk.vendor),
            pc.if_else(missing, null_text, text),
            pc.if_else(missing, null_text, _money(total, "", ".")),
            pc.if_else(missing, null_text, _take(codes, _VENDOR_CURRENCY[chunk.vendor])),
        ], schema=INVOICES_SCHEMA))
    return pa.Table.from_batches(batches, schema=INVOICES_SCHEMA)


def _number(values: IntArray) -> pa.Array:
    return pc.cast(pa.array(values, pa.int64()), pa.string())


def _dates(chunk: _InvoicePlan, pools: _InvoicePools, layout: int) -> tuple[pa.Array, pa.Array]:
    style = np.array(_LAYOUT_DATE_STYLE[layout], dtype=np.int64)[_VENDOR_CURRENCY[chunk.vendor]]
    term_days = np.array([days for days, _ in _TERMS], dtype=np.int64)[chunk.terms]
    return (_take(pools.dates, style * _DATE_DAYS + chunk.issue_day),
            _take(pools.dates, style * _DATE_DAYS + chunk.issue_day + term_days))


def _invoice_id(chunk: _InvoicePlan) -> pa.Array:
    return _concat("INV-2026-", pc.utf8_lpad(_number(chunk.sequence), width=6, padding="0"))


def _po(chunk: _InvoicePlan, label: str) -> pa.Array:
    """`label` and the purchase order number where the invoice has one, else null."""
    return pc.if_else(pa.array(chunk.po >= 0),
                      _concat(label, _number(np.maximum(chunk.po, 0))),
                      pa.scalar(None, pa.string()))


def _item_parts(chunk: _InvoicePlan, pools: _InvoicePools, j: int, thousands: str,
                decimal: str) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """Slot j's description (null past the invoice's items), quantity, unit price, amount."""
    missing = chunk.n_items <= j
    return (_take(pools.descriptions, chunk.item[:, j], missing),
            _number(chunk.quantity[:, j]),
            _money(chunk.unit[:, j], thousands, decimal),
            _money(chunk.quantity[:, j] * chunk.unit[:, j], thousands, decimal))


def _layout_table(chunk: _InvoicePlan, pools: _InvoicePools, greeting: IntArray,
                  extra: IntArray) -> pa.Array:
    """A: a fixed-width table, as billing software prints it into a plain-text email."""
    issue, due = _dates(chunk, pools, 0)
    code = _take(pools.code, chunk.vendor)
    w_desc, w_qty, w_unit, w_amount = _A_WIDTHS
    header = (f"{'Description':<{w_desc}}{'Qty':>{w_qty}}{'Unit price':>{w_unit}}"
              f"{'Amount':>{w_amount}}\n{_A_RULE}")
    lines = []
    for j in range(_MAX_ITEMS):
        desc, qty, unit, amount = _item_parts(chunk, pools, j, ",", ".")
        lines.append(_concat(pc.utf8_rpad(desc, width=w_desc), pc.utf8_lpad(qty, width=w_qty),
                             pc.utf8_lpad(unit, width=w_unit),
                             pc.utf8_lpad(amount, width=w_amount)))
    label_width = w_desc + w_qty + w_unit

    def total_line(label: Any, cents: IntArray) -> pa.Array:
        if isinstance(label, str):
            label = pa.array([label] * len(cents), pa.string())
        return _concat(pc.utf8_lpad(label, width=label_width),
                       pc.utf8_lpad(_money(cents, ",", "."), width=w_amount))

    terms = _take(pa.array([t for _, t in _TERMS], pa.string()), chunk.terms)
    return _join([
        _concat("INVOICE\n\n", _take(pools.vendor, chunk.vendor), "\n",
                _take(pools.address, chunk.vendor), "\n\nInvoice number: ", _invoice_id(chunk),
                "\nIssue date: ", issue, "\nDue date: ", due),
        _po(chunk, "PO number: PO-"),
        _concat("\nBill to:\n", _take(pools.bill_to, chunk.vendor), "\n\nAll amounts in ",
                code, "\n\n", header),
        *lines,
        _concat(_A_RULE, "\n", total_line("Subtotal", chunk.subtotal), "\n",
                total_line(_take(pools.tax_a, chunk.vendor), chunk.tax), "\n",
                total_line(_concat("Total due (", code, ")"), chunk.total),
                "\n\nPayment terms: ", terms, ". Please pay to ",
                _take(pools.bank, chunk.vendor), "."),
    ], "\n")


def _layout_email(chunk: _InvoicePlan, pools: _InvoicePools, greeting: IntArray,
                  extra: IntArray) -> pa.Array:
    """B: a short email with one bullet line per item and symbol-prefixed amounts."""
    issue, due = _dates(chunk, pools, 1)
    symbol = _take(pools.symbol, chunk.vendor)

    def money(cents: IntArray) -> pa.Array:
        return _concat(symbol, _money(cents, ",", "."))

    lines = []
    for j in range(_MAX_ITEMS):
        desc, qty, _, _ = _item_parts(chunk, pools, j, ",", ".")
        lines.append(_concat("- ", desc, ": ", qty, " x ", money(chunk.unit[:, j]), " = ",
                             money(chunk.quantity[:, j] * chunk.unit[:, j])))
    contact = _take(pools.contacts, chunk.vendor * _CONTACTS + extra % _CONTACTS)
    return _join([
        _concat(_take(pools.greetings, chunk.vendor * len(_EMAIL_GREETINGS) + greeting),
                "\n\nPlease find below our invoice ", _invoice_id(chunk),
                _take(pa.array(_EMAIL_INTROS, pa.string()), extra % len(_EMAIL_INTROS)),
                "\n\nInvoice date: ", issue, "\nPayment due: ", due,
                "\nBilled to: ", _take(pools.bill_to_line, chunk.vendor)),
        _po(chunk, "Your reference: PO-"),
        "\nItems:",
        *lines,
        _concat("\nSubtotal: ", money(chunk.subtotal), "\n",
                _take(pools.tax_b, chunk.vendor), ": ", money(chunk.tax),
                "\nTotal due: ", money(chunk.total), " ", _take(pools.code, chunk.vendor),
                "\n\n", _take(pa.array(_EMAIL_PAYMENT, pa.string()),
                              (extra // 7) % len(_EMAIL_PAYMENT)),
                " ", _take(pools.bank, chunk.vendor), ".\n\nKind regards,\n", contact, "\n",
                _take(pools.vendor, chunk.vendor)),
    ], "\n")


def _layout_compact(chunk: _InvoicePlan, pools: _InvoicePools, greeting: IntArray,
                    extra: IntArray) -> pa.Array:
    """C: a compact pipe table with local number formats (1.234,56 for euros)."""
    issue, due = _dates(chunk, pools, 2)
    code = _take(pools.code, chunk.vendor)
    euro = _VENDOR_CURRENCY[chunk.vendor] == CURRENCIES.index("EUR")

    def money(cents: IntArray) -> pa.Array:
        return _money_local(cents, euro)

    lines = []
    for j in range(_MAX_ITEMS):
        missing = chunk.n_items <= j
        lines.append(_concat(
            _take(pa.array([str(k) for k in range(1, _MAX_ITEMS + 1)], pa.string()),
                  np.full(len(missing), j), missing),
            " | ", _take(pools.descriptions, chunk.item[:, j]), " | ",
            _number(chunk.quantity[:, j]), " | ", money(chunk.unit[:, j]), " | ",
            money(chunk.quantity[:, j] * chunk.unit[:, j])))
    return _join([
        _concat(_take(pools.vendor, chunk.vendor), " | ", _take(pools.address, chunk.vendor),
                "\nInvoice no. ", _invoice_id(chunk), " | Date ", issue, " | Due ", due,
                "\nCustomer: ", _take(pools.bill_to_line, chunk.vendor)),
        _po(chunk, "Reference: PO-"),
        _concat("\nPos | Description | Qty | Unit price | Net amount"),
        *lines,
        _concat("Net total: ", money(chunk.subtotal), " ", code, "\n",
                _take(pools.tax_c, chunk.vendor), ": ", money(chunk.tax), " ", code,
                "\nAmount due: ", money(chunk.total), " ", code,
                "\n\nBank: ", _take(pools.bank, chunk.vendor)),
    ], "\n")


def _money_local(cents: IntArray, euro: BoolArray) -> pa.Array:
    """'1.234,56' where `euro`, else '1,234.56'."""
    return pc.if_else(pa.array(euro), _money(cents, ".", ","), _money(cents, ",", "."))


_LAYOUTS: tuple[Callable[[_InvoicePlan, _InvoicePools, IntArray, IntArray], pa.Array], ...] = (
    _layout_table, _layout_email, _layout_compact)

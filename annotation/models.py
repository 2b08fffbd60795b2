"""The annotation database: typed SQLAlchemy 2 models.

The rules the domain depends on live in the schema, so no code path can break them: one rating
per (response, annotator, objective), non-negative scores (each protocol checks its own range), a status that is either ``draft`` or
``submitted``, unique annotator names, one response text per item.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

DRAFT, SUBMITTED = "draft", "submitted"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Annotator(Base):
    """An expert account. ``password_hash`` is NULL for annotators created by ``import-ratings``:
    their ratings are stored, but they cannot sign in until an admin sets a password."""

    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(400))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)  # kept equal to role == "admin"
    # rater | examiner | admin (annotation.accounts.ROLES); server_default fills rows of older files.
    role: Mapped[str] = mapped_column(String(16), default="rater", server_default="rater")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SignIn(Base):
    """A signed-in session: the UI holds the random token, the database only its SHA-256."""

    __tablename__ = "sign_ins"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ProtocolRow(Base):
    """A protocol as stored: ``spec`` is the full definition (objectives, rubric, guidelines)."""

    __tablename__ = "protocols"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    title: Mapped[str] = mapped_column(Text)
    guidelines: Mapped[str] = mapped_column(Text)
    spec: Mapped[dict] = mapped_column(JSON)
    version: Mapped[str | None] = mapped_column(String(40))  # the protocol file's ``version``
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    objectives: Mapped[list["ProtocolObjective"]] = relationship(
        back_populates="protocol", order_by="ProtocolObjective.position", cascade="all, delete-orphan")


class ProtocolObjective(Base):
    """One objective of a protocol, with its four level definitions (scores 0–3)."""

    __tablename__ = "protocol_objectives"
    __table_args__ = (UniqueConstraint("protocol_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text)
    position: Mapped[int] = mapped_column(Integer)
    levels: Mapped[list] = mapped_column(JSON)

    protocol: Mapped[ProtocolRow] = relationship(back_populates="objectives")


class Item(Base):
    """A query to be rated; ``uid`` is the user's ``item_id`` or derived from protocol + query."""

    __tablename__ = "items"
    __table_args__ = (Index("ix_items_protocol_query", "protocol_id", "query_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(200), unique=True)
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id"))
    query: Mapped[str] = mapped_column(Text)
    query_hash: Mapped[str] = mapped_column(String(64))
    # raters wanted for this item (k); None: the protocol's, else DEFAULT_TARGET_ANNOTATORS
    target_raters: Mapped[int | None] = mapped_column(Integer)
    is_gold: Mapped[bool | None] = mapped_column(Boolean, default=False)
    # raters who submitted it (kept by workflow.assign), so finding items short of k raters
    # does not count every assignment of the study on each request
    submitted_count: Mapped[int | None] = mapped_column(Integer, default=0)
    added_by: Mapped[str | None] = mapped_column(String(200))  # account that sent it from the app; None: CLI import
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    responses: Mapped[list["Response"]] = relationship(
        back_populates="item", order_by="Response.position", cascade="all, delete-orphan")
    protocol: Mapped[ProtocolRow] = relationship()


class Response(Base):
    """One response to an item's query; ``position`` keeps the order of first appearance."""

    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("item_id", "text_hash"), UniqueConstraint("item_id", "position"))

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    text_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str | None] = mapped_column(String(400))
    position: Mapped[int] = mapped_column(Integer)
    gold: Mapped[dict | None] = mapped_column(JSON)  # known scores {objective: score} of a gold item

    item: Mapped[Item] = relationship(back_populates="responses")


class Rating(Base):
    """One annotator's score of one response on one objective, under a protocol version."""

    __tablename__ = "ratings"
    __table_args__ = (
        UniqueConstraint("response_id", "annotator_id", "objective", name="uq_rating_response_annotator_objective"),
        CheckConstraint("score BETWEEN 0 AND 10", name="ck_rating_score_0_10"),
        CheckConstraint(f"status IN ('{DRAFT}', '{SUBMITTED}')", name="ck_rating_status"),
        Index("ix_ratings_annotator_status", "annotator_id", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    objective: Mapped[str] = mapped_column(String(200))
    score: Mapped[int] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default=DRAFT)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    protocol_version: Mapped[str | None] = mapped_column(String(40))


class Assignment(Base):
    """An item handed to a rater. Open assignments count towards the item's k raters for
    ``ASSIGNMENT_TTL`` (store), so concurrent raters spread over items; submitted ones for good."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("item_id", "annotator_id", name="uq_assignment_item_annotator"),
                      Index("ix_assignments_annotator", "annotator_id", "status"))

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="open")  # open | submitted
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Review(Base):
    """An examiner's final score of one response on one objective, with the reason."""

    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("response_id", "objective", name="uq_review_response_objective"),
                      CheckConstraint("score BETWEEN 0 AND 10", name="ck_review_score_0_10"))

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    objective: Mapped[str] = mapped_column(String(200))
    score: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    examiner_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    protocol_version: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RatingEvent(Base):
    """The audit trail: one row per change of a rating or a final score (who, when, old -> new,
    through which path). Rows are only ever added."""

    __tablename__ = "rating_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))  # account name, or "operator" (command line)
    path: Mapped[str] = mapped_column(String(60))  # app | import-ratings | import-ratings --overwrite | review
    kind: Mapped[str] = mapped_column(String(16))  # rating | review
    item_uid: Mapped[str] = mapped_column(String(200))
    response_id: Mapped[int] = mapped_column(Integer)
    rater: Mapped[str | None] = mapped_column(String(200))  # whose rating (None for a review)
    objective: Mapped[str] = mapped_column(String(200))
    old_score: Mapped[int | None] = mapped_column(Integer)
    new_score: Mapped[int | None] = mapped_column(Integer)
    old_status: Mapped[str | None] = mapped_column(String(16))
    new_status: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)  # the examiner's reason


class ABStudy(Base):
    """A blind A/B study: the same held-out queries' drafts corrected by a baseline and a
    candidate aligner, rated by the study's raters without knowing which is which. Which
    response came from which aligner is recorded here (and in :class:`ABResponse`) for admins."""

    __tablename__ = "ab_studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id"))
    baseline: Mapped[str] = mapped_column(Text)  # MODEL strings
    candidate: Mapped[str] = mapped_column(Text)
    template: Mapped[str] = mapped_column(String(40))
    seed: Mapped[int] = mapped_column(Integer)
    queries: Mapped[list] = mapped_column(JSON)  # uids of the study items whose queries (and drafts) were used
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ABResponse(Base):
    """Which aligner (``baseline`` or ``candidate``) wrote one response of an A/B item."""

    __tablename__ = "ab_responses"
    # Both arms may point at one response: two identical corrections are one response (a tie).
    __table_args__ = (CheckConstraint("arm IN ('baseline', 'candidate')", name="ck_ab_arm"),
                      UniqueConstraint("response_id", "arm", name="uq_ab_response_arm"))

    id: Mapped[int] = mapped_column(primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("ab_studies.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    arm: Mapped[str] = mapped_column(String(16))
    source_item: Mapped[str] = mapped_column(String(200))  # uid of the study item the query came from


class SignInThrottle(Base):
    """Failed sign-ins per account name or client address, shared by every process on this
    database (see :mod:`annotation.throttle`). Times are seconds since the epoch."""

    __tablename__ = "sign_in_throttle"

    key: Mapped[str] = mapped_column(String(320), primary_key=True)  # "account:<name>" or "client:<address>"
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure: Mapped[float] = mapped_column(Float, default=0.0)
    in_flight: Mapped[int] = mapped_column(Integer, default=0)  # checks running now, in any process
    in_flight_since: Mapped[float] = mapped_column(Float, default=0.0)

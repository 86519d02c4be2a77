"""clinical safety: input gating and the header facts drift monitoring reads (instances), the out-of-distribution
score (predictions), an index for time windows, and the append-only audit trail (audit, audit_prune, triggers)

Columns are only added (nullable, no default: O(1) on SQLite and PostgreSQL); the views gain columns when
``db.migrate.upgrade`` recreates them. Instances indexed before this revision were never gated: their
``gating_notes`` say so.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

BEFORE_GATING = ("indexed before input gating existed (schema revision 0007): view and age were not checked; the "
                 "film was screened as any other")

INSTANCE_COLUMNS = (
    sa.Column("view_position", sa.String(16), nullable=True),
    sa.Column("age_years", sa.Integer(), nullable=True),
    sa.Column("manufacturer", sa.String(64), nullable=True),
    sa.Column("manufacturer_model", sa.String(64), nullable=True),
    sa.Column("bits_stored", sa.Integer(), nullable=True),
    sa.Column("pixel_spacing", sa.Float(), nullable=True),
    sa.Column("population_route", sa.String(32), nullable=True),
    sa.Column("outside_population", sa.Text(), nullable=True),
    sa.Column("gating_notes", sa.Text(), nullable=True),
)
PREDICTION_COLUMNS = (
    sa.Column("ood_score", sa.Float(), nullable=True),
    sa.Column("out_of_distribution", sa.Boolean(), nullable=True),
)

UPDATE_REFUSED = "the audit trail is append-only: its rows are never changed"
DELETE_REFUSED = ("the audit trail is append-only: rows are deleted only by `neuron audit --prune-before DATE`, which "
                  "records that it did")

# SQLite: RAISE(ABORT) in a BEFORE trigger (https://www.sqlite.org/lang_createtrigger.html, "The RAISE() function").
SQLITE_TRIGGERS = (
    f"CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, '{UPDATE_REFUSED}'); END",
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit "
    "WHEN NOT EXISTS (SELECT 1 FROM audit_prune WHERE old.at < audit_prune.\"before\") "
    f"BEGIN SELECT RAISE(ABORT, '{DELETE_REFUSED}'); END",
)
# PostgreSQL: a row trigger for UPDATE and DELETE, and a statement trigger for TRUNCATE, which skips row triggers
# (PostgreSQL documentation, CREATE TRIGGER: "TRUNCATE ... FOR EACH STATEMENT").
POSTGRES_TRIGGERS = (
    f"""CREATE FUNCTION neuron_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' AND EXISTS (SELECT 1 FROM audit_prune WHERE OLD.at < audit_prune."before") THEN
            RETURN OLD;
        END IF;
        IF TG_OP = 'UPDATE' THEN
            RAISE EXCEPTION '{UPDATE_REFUSED}';
        END IF;
        RAISE EXCEPTION '{DELETE_REFUSED}';
    END $$""",
    "CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit FOR EACH ROW "
    "EXECUTE FUNCTION neuron_audit_append_only()",
    "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit FOR EACH STATEMENT "
    "EXECUTE FUNCTION neuron_audit_append_only()",
)


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch_op:
        for column in INSTANCE_COLUMNS:
            batch_op.add_column(column.copy())
    with op.batch_alter_table("predictions") as batch_op:
        for column in PREDICTION_COLUMNS:
            batch_op.add_column(column.copy())
    op.create_index("ix_predictions_processed_at", "predictions", ["processed_at"])
    op.execute(sa.text("UPDATE instances SET gating_notes = :note").bindparams(note=BEFORE_GATING))
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("address", sa.String(128), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("target", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_audit_at", "audit", ["at"])
    op.create_index("ix_audit_study", "audit", ["study_instance_uid"])
    op.create_table("audit_prune", sa.Column("before", sa.DateTime(timezone=True), primary_key=True))
    triggers = POSTGRES_TRIGGERS if op.get_bind().dialect.name == "postgresql" else SQLITE_TRIGGERS
    for ddl in triggers:
        op.execute(ddl)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE audit CASCADE")
        op.execute("DROP FUNCTION neuron_audit_append_only()")
    else:
        op.drop_table("audit")
    op.drop_table("audit_prune")
    op.drop_index("ix_predictions_processed_at", "predictions")
    with op.batch_alter_table("predictions") as batch_op:
        for column in PREDICTION_COLUMNS:
            batch_op.drop_column(column.name)
    with op.batch_alter_table("instances") as batch_op:
        for column in INSTANCE_COLUMNS:
            batch_op.drop_column(column.name)

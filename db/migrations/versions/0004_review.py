"""studies (header facts for the worklist, a summary of each study's results) and verdicts (the review page)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_instance_uid", sa.String(64), primary_key=True),
        sa.Column("study_date", sa.Date(), nullable=True),
        sa.Column("accession_number", sa.String(16), nullable=True),
        sa.Column("study_description", sa.String(64), nullable=True),
        sa.Column("patient_key", sa.String(64), nullable=True),
        sa.Column("modalities", sa.String(64), nullable=True),
        sa.Column("top_probability", sa.Float(), nullable=True),
        sa.Column("top_label", sa.String(64), nullable=True),
        sa.Column("top_model", sa.String(64), nullable=True),
        sa.Column("positive_findings", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("needs_review", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("screened_instances", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("screened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_studies_top_probability", "studies", ["top_probability"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_studies_patient_key", "studies", ["patient_key"])
    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("frame", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("weights", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_verdicts_study", "verdicts", ["study_instance_uid"])
    op.create_index("ix_verdicts_finding", "verdicts", ["sop_instance_uid", "frame", "model", "weights", "label"])
    # Studies indexed before this revision: their rows and summaries from what the database already holds (the header
    # columns stay empty until their files are scanned again).
    from db.schema import Prediction
    from db.studies import refresh_studies

    conn = op.get_bind()
    uids = conn.execute(sa.text("SELECT DISTINCT study_instance_uid FROM instances")).scalars().all()
    # the needs-review rule of this revision: the columns revision 0007 adds to it do not exist yet
    refresh_studies(conn, uids, needs_review=Prediction.needs_review)


def downgrade() -> None:
    op.drop_table("verdicts")
    op.drop_table("studies")

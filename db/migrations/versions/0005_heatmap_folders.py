"""heatmap_folders: the folders screening runs wrote heatmaps into, so the review page serves a finding's heatmap
from wherever the run wrote it (confined to those folders), whatever folder the review is started from

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# a heatmap's stored path is FOLDER + "/" + 2 hex + "/" + 32 hex + ".png" (worker.results.heatmap_name)
NAME_LENGTH = len("/00/") + 32 + len(".png")


def upgrade() -> None:
    folders = op.create_table(
        "heatmap_folders",
        sa.Column("path", sa.Text(), primary_key=True),
        sa.Column("first_used_at", sa.DateTime(timezone=True), nullable=False),
    )
    conn = op.get_bind()
    found = conn.execute(sa.text(
        f"SELECT DISTINCT substr(heatmap_path, 1, length(heatmap_path) - {NAME_LENGTH}) FROM predictions "
        f"WHERE heatmap_path IS NOT NULL AND length(heatmap_path) > {NAME_LENGTH}")).scalars().all()
    if found:
        now = conn.execute(sa.text("SELECT CURRENT_TIMESTAMP")).scalar()
        op.bulk_insert(folders, [{"path": p, "first_used_at": now} for p in sorted(set(found))])


def downgrade() -> None:
    op.drop_table("heatmap_folders")

from django.db import models


class Report(models.Model):
    """A report someone asked for; its total is filled in by a task."""

    size = models.PositiveIntegerField()
    total = models.BigIntegerField(null=True)
    result_id = models.CharField(max_length=64, blank=True)

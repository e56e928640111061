from django.db import models


class Note(models.Model):
    text = models.CharField(max_length=200)
    written_by = models.CharField(max_length=200, default="")

    class Meta:
        db_table = "offload_shop_note"

"""Database backups to S3 and their verified restore (``python -m backup``, ``ironlink backup``).

A dump is streamed from the engine's own tool (``pg_dump``, ``influx backup`` then ``tar``) to the
region's bucket with a boto3 multipart upload; the SHA-256 and byte count of the whole stream are
kept in the object's metadata, and a restore checks both before it touches a database.
"""

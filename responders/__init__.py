"""Composing and sending mail: templates rendered in a sandbox, safe headers, SMTP and Maildir.

This package never touches the database or the config loader; callers pass plain values.
"""

"""Generated from proto/ by `python -m service.protogen`; do not edit."""

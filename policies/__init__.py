"""Data, not code: the default policy and the service templates that `bundle install` renders."""

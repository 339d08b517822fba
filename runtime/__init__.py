"""Everything that runs on the appliance: policy, API server, engine, admission, auth, egress guard, audit log.

Never imports `bundler`.
"""

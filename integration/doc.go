// Package integration holds shadowctl's end-to-end tests against a real
// PostgreSQL (see integration/pgtest for where it comes from). It has no
// production code.
package integration

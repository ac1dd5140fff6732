// Config for the SMART bulk-data-client (node . --config /abs/path/to/this/file ...)
// against `go run ./examples/server -clients NAME=TOKEN`.
// tokenUrl "none": no SMART Backend Services token request; the fixed bearer
// token below goes on every kick-off, status, DELETE and file request instead.
// Replace s3cret with the TOKEN given to -clients. See docs/conformance.md §4.1.
module.exports = {
    tokenUrl: "none",
    requests: { headers: { authorization: "Bearer s3cret" } }
};

// Package fhirbulk is the wire vocabulary of the FHIR Bulk Data export
// protocol: the completion manifest, OperationOutcome and its issues, the
// export levels, and FHIR instants. It uses the standard library only.
//
// The server side (package bulkexport) writes these types and the client
// side (package client) reads them; neither needs the other to speak the
// protocol. A program that only decodes manifests or error answers can
// import this package alone.
package fhirbulk

package blobstorage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"

	"gocloud.dev/blob"
)

// reader is a FileReader over an object. It streams from one read request
// at a time: the one Open made, at first; after a Seek elsewhere, a range
// read from the new offset, started by the next Read. Seeking costs
// nothing until then, so http.ServeContent's size probe (Seek to the end
// and back) keeps the first request.
type reader struct {
	ctx     context.Context
	bucket  *blob.Bucket
	key     string
	size    int64
	modTime time.Time

	r      *blob.Reader // the current read request, or nil
	rpos   int64        // where r is in the object
	pos    int64        // where the next Read reads
	closed bool
}

var errReaderClosed = fmt.Errorf("blobstorage: reader closed: %w", fs.ErrClosed)

// Read reads from the current offset, starting a range read there if the
// current request is elsewhere.
func (r *reader) Read(p []byte) (int, error) {
	if r.closed {
		return 0, errReaderClosed
	}
	if r.pos >= r.size {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	if r.r != nil && r.rpos != r.pos {
		_ = r.r.Close()
		r.r = nil
	}
	if r.r == nil {
		rr, size, modTime, err := openRange(r.ctx, r.bucket, r.key, r.pos)
		if err != nil {
			return 0, wrapErr("read", r.key, err)
		}
		// The object must still be the one Open found: a replaced object
		// would mix two versions.
		if size != r.size || !modTime.Equal(r.modTime) {
			_ = rr.Close()
			return 0, fmt.Errorf("blobstorage: read %s: the object was replaced since it was opened", r.key)
		}
		r.r, r.rpos = rr, r.pos
	}
	n, err := r.r.Read(p)
	r.pos += int64(n)
	r.rpos = r.pos
	if errors.Is(err, io.EOF) && r.pos < r.size {
		err = fmt.Errorf("blobstorage: read %s: %w at %d of %d bytes", r.key, io.ErrUnexpectedEOF, r.pos, r.size)
	} else if err != nil && !errors.Is(err, io.EOF) {
		err = fmt.Errorf("blobstorage: read %s: %w", r.key, err)
	}
	return n, err
}

// Seek sets the offset of the next Read. It makes no request.
func (r *reader) Seek(offset int64, whence int) (int64, error) {
	if r.closed {
		return 0, errReaderClosed
	}
	var abs int64
	switch whence {
	case io.SeekStart:
		abs = offset
	case io.SeekCurrent:
		abs = r.pos + offset
	case io.SeekEnd:
		abs = r.size + offset
	default:
		return 0, fmt.Errorf("blobstorage: seek %s: invalid whence %d: %w", r.key, whence, fs.ErrInvalid)
	}
	if abs < 0 {
		return 0, fmt.Errorf("blobstorage: seek %s: negative offset %d: %w", r.key, abs, fs.ErrInvalid)
	}
	r.pos = abs
	return abs, nil
}

// Close ends the current request. Reading after Close is an error.
func (r *reader) Close() error {
	if r.closed {
		return errReaderClosed
	}
	r.closed = true
	if r.r != nil {
		err := r.r.Close()
		r.r = nil
		return err
	}
	return nil
}

// Size implements bulkexport.FileReader: the object's length.
func (r *reader) Size() int64 { return r.size }

// ModTime implements bulkexport.FileReader: the object's last
// modification, which is when it was committed.
func (r *reader) ModTime() time.Time { return r.modTime }

// openRange starts a read of key from offset to the end, and returns the
// object's size and modification time as the read request saw them.
//
// fileblob takes them from a Stat of the path made before it opens the
// file, so a file replaced in between would be read with the size of the
// one before. When the driver hands out its *os.File (fileblob does, to
// ReaderOptions.BeforeRead), they come from that file instead.
func openRange(ctx context.Context, bucket *blob.Bucket, key string, offset int64) (*blob.Reader, int64, time.Time, error) {
	var fi os.FileInfo
	opts := &blob.ReaderOptions{BeforeRead: func(as func(any) bool) error {
		var f *os.File
		if as(&f) && f != nil {
			var err error
			if fi, err = f.Stat(); err != nil {
				return err
			}
		}
		return nil
	}}
	r, err := bucket.NewRangeReader(ctx, key, offset, -1, opts)
	if err != nil {
		return nil, 0, time.Time{}, err
	}
	if fi != nil {
		return r, fi.Size(), fi.ModTime(), nil
	}
	return r, r.Size(), r.ModTime(), nil
}

